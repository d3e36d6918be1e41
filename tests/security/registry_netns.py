"""Run by test_registry_hostile in a new network namespace (`unshare --net`): prints, per
scenario, the client's error and how many requests reached the service it must not reach."""

from __future__ import annotations

import json
import subprocess

from runv_py.errors import RunvError
from runv_py.oci.image.registry import RegistryClient

from .hostile_registry import OCI_MANIFEST, HostileRegistry, challenge, json_answer, redirect

PUBLIC = "192.0.2.10"          # TEST-NET-1: not loopback, not link-local
METADATA = "169.254.169.254"   # a cloud's instance metadata service lives here
REPO = "team/app"


def main() -> None:
    for argv in (["ip", "link", "set", "lo", "up"],
                 ["ip", "addr", "add", f"{PUBLIC}/32", "dev", "lo"],
                 ["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"]):
        subprocess.run(argv, check=True)
    internal = HostileRegistry("127.0.0.1", 8080)
    metadata = HostileRegistry(METADATA, 80)
    public = HostileRegistry(PUBLIC, 5000)
    mirror = HostileRegistry(PUBLIC, 5002)
    local = HostileRegistry("127.0.0.1", 5001)
    good = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
    mirror.routes[f"/v2/{REPO}/manifests/ok"] = json_answer(good, OCI_MANIFEST)
    scenarios = {
        "loopback redirect": (public, redirect("http://127.0.0.1:8080/secret"), internal,
                              "loopback"),
        "localhost by name": (public, redirect("http://localhost:8080/secret"), internal,
                              "loopback"),
        "loopback token realm": (public, challenge(
            'Bearer realm="http://127.0.0.1:8080/token",service="x"'), internal, "loopback"),
        "link-local redirect": (local, redirect(f"http://{METADATA}/latest/meta-data"),
                                metadata, "link-local"),
        "same-class redirect": (public, redirect(f"http://{PUBLIC}:5002/v2/{REPO}/manifests/ok"),
                                internal, ""),
    }
    outcomes = {}
    for name, (registry, responder, target, kind) in scenarios.items():
        registry.routes[f"/v2/{REPO}/manifests/{len(outcomes)}"] = responder
        before = len(target.seen)
        client = RegistryClient(registry.host, REPO, insecure=True)
        error = None
        try:
            client.manifest(str(len(outcomes)))
        except RunvError as exc:
            error = str(exc)
        outcomes[name] = {"error": error, "hits": len(target.seen) - before, "kind": kind}
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
