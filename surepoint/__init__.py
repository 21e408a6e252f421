"""surepoint: application-aware, image-level backup for KVM/QEMU virtual machines and Linux block storage."""

__version__ = "0.1.0"
