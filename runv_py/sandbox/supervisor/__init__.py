"""The sandbox supervisor: one long-lived host process per sandbox (`python -m
runv_py.sandbox.supervisor`, started by `runv create`, the shim, hyperctl or the warm pool, in
its own session and mount namespace). It owns the VM (QEMU and its agent connection), the
shared directory with its mounts, the guest's network attachment, and the lifecycle of the
sandbox's containers: the one it was started for and, for a pod, the others that join it. Its
clients talk to it over its control socket (protocol.py, client.py).

  launch.py      the two ways a supervisor gets its sandbox (for a container; from the pool)
  server.py      Supervisor: the containers and one handler per control operation
  containers.py  GuestContainer, GuestProcess: what it tracks per container and process
  stdio.py       an attached process's stdio, signals and exit status
  shares.py      a container's files in the shared directory"""
