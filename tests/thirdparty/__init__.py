"""Real third-party architectures (torchvision, timm, transformers), random init, small configs."""
