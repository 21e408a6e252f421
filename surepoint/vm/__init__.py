"""Backing up running KVM/QEMU VMs: QMP, the guest agent, a userspace NBD client, point-in-time views."""
