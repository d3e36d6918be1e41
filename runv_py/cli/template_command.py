"""`runv template`: create, list, inspect and remove the VM templates sandboxes start from."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import RuntimeConfig

HELP = """\
A template is a VM booted once to "agent ready" and saved; runv starts sandboxes by restoring
it (copy-on-write over its memory) instead of booting (docs/templates.md). Templates are built
on first use; `create` builds one ahead of time. Each is keyed by everything that makes it valid
(kernel, image, agent, QEMU, vCPUs, memory, shares); a change means a new template.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("template", help="manage the VM templates sandboxes start from",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="template_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create", help="build the template for the runtime config (no-op if it exists)",
        description="Build the template that `runv create` will use with the runtime config "
                    "($RUNV_CONFIG or /etc/runv/config.toml), and print its key.")
    create.add_argument("--memory", type=int, metavar="MIB",
                        help="guest memory (default: the config's; containers with a memory "
                             "limit get their own template)")
    create.add_argument("--vcpus", type=int, help="guest vCPUs (default: the config's)")
    create.add_argument("--bare", action="store_true",
                        help="no shared directory (what `hyperctl` sandboxes use)")
    listing = actions.add_parser("list", help="list the templates")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    inspect = actions.add_parser("inspect", help="print a template's inputs and sizes as JSON")
    inspect.add_argument("key", help="the key, or a unique prefix of it")
    remove = actions.add_parser("rm", help="remove templates (running clones are unaffected)")
    remove.add_argument("keys", nargs="*", metavar="KEY", help="keys or unique prefixes")
    remove.add_argument("--all", action="store_true", help="remove every template")


def _describe(template: Any) -> dict[str, Any]:
    meta = template.meta()
    inputs = meta.get("inputs", {})
    memory = template.memory.stat()
    return {
        "key": template.key,
        "path": str(template.root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.get("created", 0))),
        "build_s": meta.get("build_s"),
        "vcpus": inputs.get("vcpus"),
        "memory_mib": inputs.get("memory_mib"),
        "share_tags": inputs.get("share_tags"),
        "state_bytes": meta.get("state_bytes"),
        "memory_file_bytes_on_disk": memory.st_blocks * 512,
        "inputs": inputs,
    }


def run(args: argparse.Namespace, config: RuntimeConfig) -> int:
    from dataclasses import replace

    from ..errors import ConfigError
    from ..sandbox import guest_spec, guest_vm, vm_template
    from ..vm.hypervisor import check_templates

    store = vm_template.TemplateStore(config.template_dir)
    action = args.template_command
    if action == "create":
        hv = config.hypervisor
        if args.memory is not None:
            hv = replace(hv, memory_mib=args.memory)
        if args.vcpus is not None:
            hv = replace(hv, vcpus=args.vcpus)
        tags = () if args.bare else (guest_spec.SHARED_TAG,)
        check_templates(config.hypervisor)
        print("preparing the template (building one boots a VM once)...", file=sys.stderr,
              flush=True)
        import asyncio

        built = asyncio.run(guest_vm.ensure_template(replace(config, hypervisor=hv), tags,
                                                    debug=args.debug))
        print(built.key)
    elif action == "list":
        described = [_describe(t) for t in store.templates()]
        if args.format == "json":
            print(json.dumps(described, indent=2))
        else:
            print(f"{'KEY':<18}{'CREATED':<22}{'VCPUS':<7}{'MEMORY':<8}{'RAM ON DISK':<13}"
                  "SHARES")
            for d in described:
                print(f"{d['key']:<18}{d['created']:<22}{d['vcpus']!s:<7}"
                      f"{str(d['memory_mib']) + 'M':<8}"
                      f"{str(d['memory_file_bytes_on_disk'] >> 20) + 'M':<13}"
                      f"{','.join(d['share_tags'] or []) or '-'}")
    elif action == "inspect":
        print(json.dumps(_describe(store.find(args.key)), indent=2))
    elif action == "rm":
        if args.all == bool(args.keys):
            raise ConfigError("template rm: give KEY... or --all")
        chosen = store.templates() if args.all else [store.find(key) for key in args.keys]
        for found in chosen:
            store.remove(found)
            print(found.key)
    return 0
