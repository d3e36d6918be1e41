"""The OCI container engine inside the guest: spec parsing, the re-exec'd init helper, and the
container and process objects the gRPC service drives."""
