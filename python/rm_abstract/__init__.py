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
from .exceptions import (BackendNotAvailableError, InvalidDeviceError, NotInitializedError, RMAbstractError,
                         RMUnavailableError)

# The HTTP client (http.client pulls in the email package), the model proxy
# and the system report are imported on first use, not at interpreter start:
# see __getattr__.
_LAZY = {"AgentClient": "client", "AgentError": "exceptions", "AgentUnavailable": "exceptions",
         "RemoteModel": "model", "get_system_info": "system", "print_system_info": "system",
         "get_quick_status": "system", "validate_system": "system", "print_validation_report": "system",
         "get_working_components": "system"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module("." + _LAZY[name], __name__), name)
    raise AttributeError("module 'rm_abstract' has no attribute %r" % name)

__version__ = "0.1.0"
__all__ = ["init", "is_initialized", "switch_device", "get_device_info", "get_controller", "get_available_backends",
           "list_plugins", "get_system_info", "print_system_info", "get_quick_status", "validate_system",
           "print_validation_report", "get_working_components",
           "RMAbstractError", "NotInitializedError", "BackendNotAvailableError", "InvalidDeviceError",
           "ConfigError", "AgentError", "AgentUnavailable", "RMUnavailableError", "RemoteModel", "__version__"]


class _State:
    """What init() decided. `config_error` is set when the injected env was bad:
    hooks still catch from_pretrained so that the documented on-unavailable
    mode (not a silent CPU run) applies."""

    def __init__(self):
        self.config = None
        self.config_error = None
        self.active = False
        self.controller = None


_state = _State()


class Controller:
    """What init() returns (the original returned its DeviceFlowController):
    `device_name`, `backend`, `config`, `get_device_info()`,
    `switch_device()`. `backend` asks the agent (once) which of its
    backends serves the device: init() itself never contacts the agent."""

    def __init__(self, config):
        self.config = config
        self._backend = None

    @property
    def device_name(self):
        """The device with its index, as the original spelt it ("cpu:0", "gpu:0")."""
        d = self.config.device
        return d if ":" in d or d in ("auto", "npu") else d + ":0"

    @property
    def backend(self):
        if self._backend is None:
            self._backend = get_device_info().get("backend")
        return self._backend

    def get_device_info(self):
        return get_device_info()

    def switch_device(self, device):
        switch_device(device)

    def __repr__(self):
        return "<rm_abstract.Controller device=%s agent=%s>" % (self.device_name, self.config.socket)


def init(device=None, cache_dir=None, compile_options=None, verbose=None, use_plugin_system=None,
         on_unavailable=None, agent_socket=None):
    """Activates the hooks and returns the Controller. Arguments left at None
    come from the environment (RM_DEVICE, RM_CACHE_DIR, RM_COMPILE_OPTIONS,
    RM_VERBOSE, RM_USE_PLUGINS, RM_ON_UNAVAILABLE, RM_AGENT_SOCKET), then
    defaults (device "auto").

    Does not contact the agent (start-up must stay cheap); the first
    from_pretrained does. Raises ConfigError (InvalidDeviceError for a bad
    device) for a bad argument or env value. Calling it again reconfigures
    (models already loaded keep their device). With verbose, one line says
    the device.
    """
    _activate(resolve(device, cache_dir, compile_options, verbose, use_plugin_system, on_unavailable, agent_socket))
    _log.info("initialized with device %s (node agent at %s)" % (_state.controller.device_name, _state.config.socket))
    return _state.controller


def _activate(cfg):
    from . import hooks
    _log.set_verbose(cfg.verbose)
    _state.config, _state.config_error, _state.active = cfg, None, True
    _state.controller = Controller(cfg)
    hooks.install()


def _init_from_env():
    """The injected case (sitecustomize): never raises; a bad env is one line.

    With a bad env the hooks are still installed in an 'unconfigured' state so
    that from_pretrained follows RM_ON_UNAVAILABLE (default: fail with the
    same message) instead of silently loading the model on the pod's CPU.
    The start-up line of init() is printed here only when RM_VERBOSE asks for
    it: every Python process of the pod runs this.
    """
    import os
    try:
        _activate(resolve())
        if os.environ.get("RM_VERBOSE"):
            _log.info("initialized with device %s (injected)" % _state.controller.device_name)
        return _state.controller
    except ConfigError as e:
        from . import hooks
        from .config import Config, ON_UNAVAILABLE
        ou = os.environ.get("RM_ON_UNAVAILABLE", "").strip().lower()
        _state.config = Config(on_unavailable=ou if ou in ON_UNAVAILABLE else "fail")
        _state.config_error, _state.active = str(e), True
        _log.warn("not configured: %s; from_pretrained will %s" % (
            e, "fall back to transformers in this process" if _state.config.on_unavailable == "fallback" else "fail"))
        hooks.install()


def is_initialized():
    return _state.active and _state.config_error is None


def get_controller():
    """The Controller of the last init(), or None."""
    return _state.controller if is_initialized() else None


def _config():
    if not is_initialized():
        raise NotInitializedError(None if _state.config_error is None
                                  else "rm_abstract is not configured: %s" % _state.config_error)
    return _state.config


def _settings():
    """init()'s settings, or before init() what init() would take from the
    environment (defaults where the environment is bad): the read-only
    calls work before init(), as in the original."""
    if is_initialized():
        return _state.config
    try:
        return resolve()
    except ConfigError:
        from .config import Config
        return Config()


def _any_client():
    from .client import AgentClient
    cfg = _settings()
    return AgentClient(cfg.socket, cfg.token, timeout=30.0)


def switch_device(device):
    """Models loaded from now on go to `device`; loaded ones keep theirs."""
    from .config import normalize_device
    cfg = _config()
    cfg.device = normalize_device(device)
    _state.controller._backend = None
    _log.info("device switched to %s" % cfg.device)


def _backends_or_warn():
    from .exceptions import AgentError
    try:
        return _any_client().backends()
    except AgentError as e:
        _log.warn_once("backends:" + str(e.agent_message), "cannot list the agent's backends: %s" % e.agent_message)
        return []


def list_plugins(available_only=True):
    """The agent's backends (its plugins): name -> display_name, priority, ...
    Works before init(). Every backend is an agent plugin, so
    `use_plugin_system` changes nothing here; it is accepted for
    compatibility with the original API."""
    out = {}
    for b in _backends_or_warn():
        if available_only and not b.get("available"):
            continue
        out[b["name"]] = {k: b.get(k) for k in ("display_name", "priority", "version", "vendor",
                                                 "device_types", "available", "reason")}
    return out


def get_available_backends():
    """{backend name: available} as the node's agent says; works before init()."""
    return {b["name"]: bool(b.get("available")) for b in _backends_or_warn()}


def get_device_info():
    """The device of this pod as the agent reports it, with the original's
    keys (device_type, device_id, name, vendor, memory_total,
    memory_available, extra) and ours (device, backend, backends,
    agent_reachable, ...). Never raises for a missing agent."""
    cfg = _config()
    kind, _, index = cfg.device.partition(":")
    info = {"device": cfg.device, "device_type": kind, "device_id": int(index or 0), "name": None, "vendor": None,
            "memory_total": None, "memory_available": None, "extra": {},
            "agent_socket": cfg.socket, "token": bool(cfg.token), "compile_options": dict(cfg.compile_options),
            "on_unavailable": cfg.on_unavailable, "injected": cfg.injected}
    from .exceptions import AgentError
    client = _any_client()
    try:
        backends = client.backends()
        info["agent_reachable"] = True
        info["backends"] = [b["name"] for b in backends if b.get("available")]
    except AgentError as e:
        info["agent_reachable"] = False
        info["error"] = e.agent_message
        return info
    try:
        devices = client.request("GET", "/v1/system").get("devices") or []
    except AgentError as e:
        devices = []
        info["extra"]["system_error"] = e.agent_message
    # "auto" and "npu" are resolved by the agent from the pod's allocation:
    # its accelerator when it holds one, else the CPU.
    accel = [d for d in devices if d.get("device_type") != "cpu"
             and (kind == "auto" or kind == d.get("device_type") or (kind == "npu" and d.get("device_type") in ("rbln", "furiosa")))]
    if kind in ("auto", "npu"):
        dev = accel[info["device_id"]] if len(accel) > info["device_id"] else (
            next((d for d in devices if d.get("device_type") == "cpu"), None) if kind == "auto" else None)
    else:
        same = [d for d in devices if d.get("device_type") == kind]
        dev = same[info["device_id"]] if len(same) > info["device_id"] else None
    if dev is not None:
        info.update(device_type=dev.get("device_type"), name=dev.get("name"), vendor=dev.get("vendor"),
                    memory_total=dev.get("memory_total_bytes"), memory_available=dev.get("memory_available_bytes"))
        info["extra"]["agent_device_id"] = dev.get("device_id")
    # the agent picks the highest-priority available backend of the type
    # (and, per model, one that accepts it)
    resolved = info["device_type"]
    fits = [b for b in backends if b.get("available") and resolved in b.get("device_types", [])]
    info["backend"] = max(fits, key=lambda b: b.get("priority", 0))["name"] if fits else None
    return info
