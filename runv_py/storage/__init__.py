"""How host files reach the guest: the sandbox's shared directory (virtio-fs or 9p)."""
