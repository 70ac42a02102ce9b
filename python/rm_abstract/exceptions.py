"""The exceptions of the original rm_abstract library, and ours under them.

Scripts written for the original catch its classes (`except
BackendNotAvailableError`, `except RMAbstractError`); every error this
package raises derives from one of them, so those handlers keep working.
Ours also derive from the builtin each one replaced (ValueError for bad
settings, RuntimeError for the rest), so code written against this package
before keeps working too. Standard library only: imported at interpreter
start in an injected pod.

    RMAbstractError
    ├── InitializationError
    ├── NotInitializedError            (also RuntimeError)
    ├── ConfigurationError
    │   └── ConfigError                (ours; also ValueError)
    │       └── InvalidDeviceError
    ├── BackendError
    │   ├── BackendNotAvailableError
    │   │   └── RMUnavailableError     (ours: a model cannot run on the device)
    │   ├── BackendInitError
    │   ├── DeviceNotFoundError
    │   └── AgentError                 (ours: the node agent answered an error)
    │       └── AgentUnavailable       (ours: no agent, or it cannot serve now)
    ├── ModelError
    │   ├── ModelLoadError
    │   ├── ModelNotLoadedError
    │   └── InferenceError
    ├── ServingError
    │   ├── ServerStartError, ServerNotRunningError, ServerConnectionError
    └── DependencyError
        └── PackageNotInstalledError
"""
from __future__ import annotations


class RMAbstractError(Exception):
    """Base of every error of rm_abstract."""


def _public(cls):
    cls.__module__ = "rm_abstract"  # tracebacks and reprs show the public name
    return cls


# -- initialization and configuration ------------------------------------------

class InitializationError(RMAbstractError):
    """init() could not complete."""


@_public
class NotInitializedError(RMAbstractError, RuntimeError):
    """A call that needs init() came before it (or after a bad configuration)."""

    def __init__(self, message=None):
        super().__init__(message or "RM Abstract Layer not initialized. Call rm_abstract.init() first.")


class ConfigurationError(RMAbstractError):
    """A setting is wrong."""


@_public
class ConfigError(ConfigurationError, ValueError):
    """A setting has a value we cannot use; the message says which and why."""


@_public
class InvalidDeviceError(ConfigError):
    """A device string is not one we know (the original's signature)."""

    def __init__(self, device, valid_formats=None, message=None):
        self.device = device
        self.valid_formats = list(valid_formats or ())
        if message is None:
            message = "Invalid device %r" % (device,)
            if self.valid_formats:
                message += "; valid formats: %s" % ", ".join(self.valid_formats)
        super().__init__(message)


# -- backends and the node agent -------------------------------------------------

class BackendError(RMAbstractError):
    """A backend (an agent plugin) failed."""


@_public
class BackendNotAvailableError(BackendError):
    """The requested backend or device cannot be used (the original's signature)."""

    def __init__(self, backend_name, reason=None, install_hint=None):
        self.backend_name, self.reason, self.install_hint = backend_name, reason, install_hint
        message = "Backend '%s' is not available" % backend_name
        if reason:
            message += ": %s" % reason
        if install_hint:
            message += "\nInstall with: %s" % install_hint
        super().__init__(message)


@_public
class RMUnavailableError(BackendNotAvailableError, RuntimeError):
    """A model could not be put on the requested device (mode 'fail').

    Raised with one complete sentence (what, where, why, what to do); it
    is a BackendNotAvailableError so that scripts written for the original
    library catch it."""

    def __init__(self, message, backend_name=None, reason=None):
        RuntimeError.__init__(self, message)
        self.backend_name, self.reason, self.install_hint = backend_name, reason, None


class BackendInitError(BackendError):
    """A backend failed to start."""


class DeviceNotFoundError(BackendError):
    """The device is not there (the original's signature)."""

    def __init__(self, device, available_devices=None):
        self.device, self.available_devices = device, available_devices
        message = "Device '%s' not found" % device
        if available_devices:
            message += ". Available devices: %s" % (available_devices,)
        super().__init__(message)


@_public
class AgentError(BackendError, RuntimeError):
    """The node agent answered with an error (status, code and its message)."""

    def __init__(self, status, message, code=None):
        RuntimeError.__init__(self, "agent: %s (HTTP %s)" % (message, status))
        self.status, self.code, self.agent_message = status, code, message


@_public
class AgentUnavailable(AgentError):
    """The agent or the device cannot serve us (no socket, refused, 503/502/504)."""


# -- models ------------------------------------------------------------------------

class ModelError(RMAbstractError):
    """A model could not be used."""


class ModelLoadError(ModelError):
    """A model failed to load (the original's signature)."""

    def __init__(self, model_name, reason=None):
        self.model_name, self.reason = model_name, reason
        super().__init__("Failed to load model '%s'%s" % (model_name, ": %s" % reason if reason else ""))


class ModelNotLoadedError(ModelError):
    def __init__(self, message=None):
        super().__init__(message or "Model not loaded. Call load_model() first.")


class InferenceError(ModelError):
    """Inference failed."""


# -- serving (kept for the original's handlers; the server is the operator's) ----

class ServingError(RMAbstractError):
    """A serving engine failed."""


class ServerStartError(ServingError):
    def __init__(self, engine_name, reason=None):
        self.engine_name, self.reason = engine_name, reason
        super().__init__("Failed to start %s server%s" % (engine_name, ": %s" % reason if reason else ""))


class ServerNotRunningError(ServingError):
    def __init__(self, engine_name=None):
        super().__init__("%s is not running. Call start_server() first."
                         % ("%s server" % engine_name if engine_name else "Server"))


class ServerConnectionError(ServingError):
    def __init__(self, url, reason=None):
        self.url, self.reason = url, reason
        super().__init__("Cannot connect to server at %s%s" % (url, ": %s" % reason if reason else ""))


# -- dependencies ------------------------------------------------------------------

class DependencyError(RMAbstractError):
    """A package the call needs is missing."""


class PackageNotInstalledError(DependencyError):
    def __init__(self, package, install_cmd=None):
        self.package, self.install_cmd = package, install_cmd
        super().__init__("Package '%s' is not installed%s"
                         % (package, ". Install with: %s" % install_cmd if install_cmd else ""))
