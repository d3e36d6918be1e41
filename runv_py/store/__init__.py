"""Per-container state under the runtime root (runc's --root)."""
