"""disagg's errors, one class per layer, each with the exit status the
CLI ends with. Every message is one line that names the field (or host, or
tool) and the fix; the CLI prints it after `error: `.

  0  done; and for check, preflight and status: all is well
  1  check, preflight, status: the answer is no (the lines say why)
  2  UsageError: the command line (options that do not go together, files
     that are not what the command reads)
  3  HostError: a host, the controller's own tools or an operation failed,
     or a deployment could not be asked (SSH, router, NATS, Prometheus)
  4  InventoryError: the inventory's data, a label or a placement is
     invalid; nothing was touched on any host
  5  ToolError: an optional tool (aiperf, AIConfigurator, matplotlib) is not
     installed, or it failed
"""


class DisaggError(Exception):
    exit_code = 1


class UsageError(DisaggError, ValueError):
    exit_code = 2


class HostError(DisaggError):
    exit_code = 3


class InventoryError(DisaggError, ValueError):
    exit_code = 4


class ToolError(DisaggError):
    exit_code = 5
