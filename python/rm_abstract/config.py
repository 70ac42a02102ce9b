"""Settings: explicit arguments, then the environment, then defaults.

Precedence is deliberate (the original library let the environment silently
override arguments): an argument the caller passes wins; an argument left at
``None`` is taken from the environment; otherwise the default applies. In a pod
the webhook sets the environment and ``sitecustomize`` calls ``init()`` with no
arguments, so the environment decides there; a script that passes
``device="cpu"`` by hand gets CPU, even inside an injected pod.
"""
from __future__ import annotations

import os

from .exceptions import ConfigError, InvalidDeviceError  # noqa: F401 - ConfigError is re-exported

DEFAULT_SOCKET = "/var/run/rm-abstract/agent.sock"
DEFAULT_ON_UNAVAILABLE = "fail"
ON_UNAVAILABLE = ("fail", "fallback")

# The agent's device grammar (agent/README.md, /v1/prepare). "npu" means the
# NPU type of the pod's allocation; the agent resolves it. "cuda" is accepted
# as a spelling of "gpu" because scripts written for torch use it.
# (No `re`/`json` imports at module level: this runs at interpreter start.)
_KINDS = ("auto", "cpu", "gpu", "cuda", "rbln", "furiosa", "npu")
_FORMATS = ("cpu", "auto", "gpu[:N]", "rbln[:N]", "furiosa[:N]", "npu[:N]")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def normalize_device(device):
    """'NPU:0' -> 'npu:0', 'cuda' -> 'gpu'; refuse anything the agent would not take."""
    if not isinstance(device, str):
        raise InvalidDeviceError(device, _FORMATS, "device must be a string like 'cpu', 'gpu:0', 'rbln:0', 'furiosa:0', "
                                 "'npu:0' or 'auto', not %r" % (device,))
    kind, sep, index = device.strip().lower().partition(":")
    if kind not in _KINDS or (sep and (not index.isdigit() or not index.isascii() or kind in ("auto", "cpu"))):
        raise InvalidDeviceError(device, _FORMATS, "device %r is not one of %s" % (device, ", ".join(_FORMATS)))
    kind = "gpu" if kind == "cuda" else kind
    return "%s:%d" % (kind, int(index)) if sep else kind


def parse_bool(name, value):
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError("%s=%r is not a boolean (use 1/0, true/false)" % (name, value))


def parse_compile_options(value):
    """RM_COMPILE_OPTIONS: a JSON object (the CRD's `compile`, camelCase).

    Keys are passed to the agent unchanged: it accepts camelCase and the
    seed's snake_case and refuses unknown keys itself, so there is one list of
    valid options (the agent's), not two that drift apart.
    """
    import json
    try:
        opts = json.loads(value)
    except ValueError as e:
        raise ConfigError("RM_COMPILE_OPTIONS is not valid JSON (%s)" % e)
    if not isinstance(opts, dict):
        raise ConfigError("RM_COMPILE_OPTIONS must be a JSON object like {\"precision\": \"q8_0\"}")
    return opts


class Config:
    """The resolved settings of one init() call."""

    __slots__ = ("device", "cache_dir", "compile_options", "verbose", "use_plugin_system",
                 "socket", "token", "on_unavailable", "injected", "pod")

    def __init__(self, device="auto", cache_dir=None, compile_options=None, verbose=True,
                 use_plugin_system=False, socket=DEFAULT_SOCKET, token=None,
                 on_unavailable=DEFAULT_ON_UNAVAILABLE, injected=False, pod=None):
        self.device = device
        self.cache_dir = cache_dir
        self.compile_options = compile_options or {}
        self.verbose = verbose
        self.use_plugin_system = use_plugin_system
        self.socket = socket
        self.token = token
        self.on_unavailable = on_unavailable
        self.injected = injected
        self.pod = pod or {}

    def as_dict(self):
        d = {k: getattr(self, k) for k in self.__slots__}
        d["token"] = "<set>" if self.token else None  # never echo the secret
        return d


def resolve(device=None, cache_dir=None, compile_options=None, verbose=None,
            use_plugin_system=None, on_unavailable=None, agent_socket=None, env=None):
    """Builds a Config; raises ConfigError naming the first bad setting."""
    env = os.environ if env is None else env

    def pick(arg, name):
        return arg if arg is not None else env.get(name) or None

    dev = pick(device, "RM_DEVICE") or "auto"
    cfg = Config(device=normalize_device(dev))
    cfg.cache_dir = pick(cache_dir, "RM_CACHE_DIR")
    if cfg.cache_dir:
        cfg.cache_dir = os.path.expanduser(cfg.cache_dir)

    if compile_options is not None:
        if not isinstance(compile_options, dict):
            raise ConfigError("compile_options must be a dict, not %s" % type(compile_options).__name__)
        cfg.compile_options = dict(compile_options)
    elif env.get("RM_COMPILE_OPTIONS"):
        cfg.compile_options = parse_compile_options(env["RM_COMPILE_OPTIONS"])

    cfg.verbose = bool(verbose) if verbose is not None else (
        parse_bool("RM_VERBOSE", env["RM_VERBOSE"]) if "RM_VERBOSE" in env else True)
    cfg.use_plugin_system = bool(use_plugin_system) if use_plugin_system is not None else (
        parse_bool("RM_USE_PLUGINS", env["RM_USE_PLUGINS"]) if "RM_USE_PLUGINS" in env else False)

    ou = (pick(on_unavailable, "RM_ON_UNAVAILABLE") or DEFAULT_ON_UNAVAILABLE).strip().lower()
    if ou not in ON_UNAVAILABLE:
        raise ConfigError("RM_ON_UNAVAILABLE / on_unavailable=%r must be 'fail' or 'fallback'" % (ou,))
    cfg.on_unavailable = ou

    cfg.socket = pick(agent_socket, "RM_AGENT_SOCKET") or DEFAULT_SOCKET
    # An accelerator's token (device plugin, with the devices) or else the
    # pod's rm-abstract.io/agent slot token: either names the pod to the agent.
    cfg.token = env.get("RM_AGENT_TOKEN") or env.get("RM_AGENT_SLOT_TOKEN") or None
    cfg.injected = env.get("RM_INJECTED") == "1"
    cfg.pod = {k: env[e] for k, e in (("name", "RM_POD_NAME"), ("namespace", "RM_POD_NAMESPACE"),
                                      ("uid", "RM_POD_UID")) if env.get(e)}
    return cfg
