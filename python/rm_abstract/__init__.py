"""rm_abstract: run unchanged transformers scripts on GPUs/NPUs via the node agent.

    import rm_abstract
    rm_abstract.init(device="rbln:0")   # or "gpu:0", "furiosa:0", "npu:0", "cpu", "auto"

After init(), `AutoModelForCausalLM.from_pretrained(...)` registers the model
with the rm-agent on this node, has it compiled for the device (cached per
node) and returns a proxy whose generate() runs there. Standard library only.
See python/README.md for the environment contract and the failure modes.
"""
from __future__ import annotations

from . import _log
from .config import ConfigError, resolve

# The HTTP client (http.client pulls in the email package) and the model
# proxy are imported on first use, not at interpreter start: see __getattr__.
_LAZY = {"AgentClient": "client", "AgentError": "client", "AgentUnavailable": "client",
         "RemoteModel": "model", "RMUnavailableError": "model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    raise AttributeError("module 'rm_abstract' has no attribute %r" % name)

__version__ = "0.1.0"
__all__ = ["init", "is_initialized", "switch_device", "get_device_info", "get_available_backends",
           "list_plugins", "ConfigError", "AgentError", "AgentUnavailable", "RMUnavailableError",
           "RemoteModel", "__version__"]


class _State:
    """What init() decided. `config_error` is set when the injected env was bad:
    hooks still catch from_pretrained so that the documented on-unavailable
    mode (not a silent CPU run) applies."""

    def __init__(self):
        self.config = None
        self.config_error = None
        self.active = False


_state = _State()


def init(device=None, cache_dir=None, compile_options=None, verbose=None, use_plugin_system=None,
         on_unavailable=None, agent_socket=None):
    """Activates the hooks. Arguments left at None come from the environment
    (RM_DEVICE, RM_CACHE_DIR, RM_COMPILE_OPTIONS, RM_VERBOSE, RM_USE_PLUGINS,
    RM_ON_UNAVAILABLE, RM_AGENT_SOCKET), then defaults (device "auto").

    Does not contact the agent (start-up must stay cheap); the first
    from_pretrained does. Raises ConfigError for a bad argument or env value.
    Calling it again reconfigures (models already loaded keep their device).
    """
    from . import hooks

    cfg = resolve(device, cache_dir, compile_options, verbose, use_plugin_system, on_unavailable, agent_socket)
    _log.set_verbose(cfg.verbose)
    _state.config, _state.config_error, _state.active = cfg, None, True
    hooks.install()
    return cfg


def _init_from_env():
    """The injected case (sitecustomize): never raises; a bad env is one line.

    With a bad env the hooks are still installed in an 'unconfigured' state so
    that from_pretrained follows RM_ON_UNAVAILABLE (default: fail with the
    same message) instead of silently loading the model on the pod's CPU.
    """
    try:
        return init()
    except ConfigError as e:
        from . import hooks
        from .config import Config, ON_UNAVAILABLE
        import os
        ou = os.environ.get("RM_ON_UNAVAILABLE", "").strip().lower()
        _state.config = Config(on_unavailable=ou if ou in ON_UNAVAILABLE else "fail")
        _state.config_error, _state.active = str(e), True
        _log.warn("not configured: %s; from_pretrained will %s" % (
            e, "fall back to transformers in this process" if _state.config.on_unavailable == "fallback" else "fail"))
        hooks.install()


def is_initialized():
    return _state.active and _state.config_error is None


def _config():
    if not is_initialized():
        raise RuntimeError("rm_abstract.init() has not been called" if _state.config_error is None
                           else "rm_abstract is not configured: %s" % _state.config_error)
    return _state.config


def switch_device(device):
    """Models loaded from now on go to `device`; loaded ones keep theirs."""
    from .config import normalize_device
    _config().device = normalize_device(device)
    _log.info("device switched to %s" % _state.config.device)


def _client():
    from .client import AgentClient
    cfg = _config()
    return AgentClient(cfg.socket, cfg.token, timeout=30.0)


def list_plugins(available_only=True):
    """The agent's backends (its plugins): name -> display_name, priority, ...

    Every backend is an agent plugin, so `use_plugin_system` changes nothing
    here; it is accepted for compatibility with the original API.
    """
    out = {}
    for b in _client().backends():
        if available_only and not b.get("available"):
            continue
        out[b["name"]] = {k: b.get(k) for k in ("display_name", "priority", "version", "vendor",
                                                 "device_types", "available", "reason")}
    return out


def get_available_backends():
    return list(list_plugins(available_only=True))


def get_device_info():
    """Settings plus what the agent says about the device; never raises for a missing agent."""
    cfg = _config()
    kind = cfg.device.split(":")[0]
    info = {"device": cfg.device, "device_type": kind, "agent_socket": cfg.socket,
            "token": bool(cfg.token), "compile_options": dict(cfg.compile_options),
            "on_unavailable": cfg.on_unavailable, "injected": cfg.injected}
    from .client import AgentError
    try:
        backends = _client().backends()
        info["agent_reachable"] = True
        # the agent picks the highest-priority available backend of the type;
        # for auto/npu the type comes from the pod's token, so it decides then
        fits = [b for b in backends if b.get("available") and kind in b.get("device_types", [])]
        info["backend"] = max(fits, key=lambda b: b.get("priority", 0))["name"] if fits else None
        info["backends"] = [b["name"] for b in backends if b.get("available")]
    except AgentError as e:
        info["agent_reachable"] = False
        info["error"] = e.agent_message
    return info
