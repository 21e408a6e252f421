"""The recovery-verification lab: VMs booted from backups on an isolated network."""
