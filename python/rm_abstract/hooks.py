"""Catching transformers' model loading without importing transformers.

init() must be cheap (it runs at every interpreter start in an injected pod),
so instead of importing transformers we put a finder on sys.meta_path that
patches the relevant modules right after they are first imported. If they are
already imported, we patch them at once.

What is caught: `from_pretrained` of causal-LM classes (names ending in
`ForCausalLM`, so AutoModelForCausalLM and LlamaForCausalLM alike):
- with torch: `_BaseAutoModelClass.from_pretrained` (every AutoModel* class)
  and `PreTrainedModel.from_pretrained` (every concrete model class);
- without torch, transformers exports placeholder classes that raise "requires
  PyTorch" on any use; those are replaced by stand-ins whose from_pretrained
  loads through the agent, which is what lets a torch-free image run models.
Other model classes (classifiers, vision, ...) are left alone: the agent
only generates text.
"""
from __future__ import annotations

import sys
import threading

_WATCH = ("transformers", "transformers.models.auto.auto_factory", "transformers.modeling_utils")
_local = threading.local()  # set while a fallback runs transformers' own loader
_installed = False


def _wanted(cls_name):
    return cls_name.endswith("ForCausalLM")


def _intercept(cls_name, name, args, kwargs, original):
    """Common path of every patched from_pretrained."""
    from . import _state
    from .model import load

    if getattr(_local, "inside", False) or not _state.active or not _wanted(cls_name):
        return original(name, *args, **kwargs)

    def fallback(n, **kw):
        _local.inside = True
        try:
            return original(n, *args, **kw)
        finally:
            _local.inside = False
    return load(_state, name, kwargs, fallback)


def _patch_classmethod(cls, attr="from_pretrained"):
    orig = cls.__dict__.get(attr)
    func = getattr(orig, "__func__", None)
    if func is None or getattr(func, "_rm_patched", False):
        return

    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        return _intercept(klass.__name__, pretrained_model_name_or_path, args, kwargs,
                          lambda n, *a, **k: func(klass, n, *a, **k))
    from_pretrained.__doc__ = func.__doc__
    from_pretrained._rm_patched = True  # never wrap twice
    setattr(cls, attr, classmethod(from_pretrained))


def _standin(name, dummy):
    """A class replacing transformers' torch-less placeholder `name`."""
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # the placeholder's from_pretrained raises transformers' own "requires PyTorch" error
        return _intercept(name, pretrained_model_name_or_path, args, kwargs,
                          lambda n, *a, **k: dummy.from_pretrained(n, *a, **k))

    def from_config(cls, *a, **k):
        raise NotImplementedError("rm_abstract: %s.from_config() builds weights in this process and needs torch; "
                                  "use from_pretrained() to run the model in the node agent" % name)
    return type(name, (), {"from_pretrained": classmethod(from_pretrained), "from_config": classmethod(from_config),
                           "__module__": "transformers", "_rm_standin": True,
                           "__doc__": "rm_abstract stand-in for transformers.%s (torch not installed)" % name})


def _is_placeholder(v):
    return type(v).__name__ == "DummyObject" and _wanted(getattr(v, "__name__", ""))


def _patch_transformers(mod):
    # transformers' top level is a _LazyModule resolving names on access; a
    # module-level __getattr__ in its __dict__ is consulted before the class's
    # own, so we see (and can replace) each name as it is first resolved.
    if "__getattr__" in mod.__dict__ and getattr(mod.__dict__["__getattr__"], "_rm_patched", False):
        return
    lazy_getattr = getattr(type(mod), "__getattr__", None)
    if lazy_getattr is None:
        return

    def __getattr__(name):
        v = lazy_getattr(mod, name)
        if _is_placeholder(v):
            v = _standin(name, v)
            setattr(mod, name, v)
        return v
    __getattr__._rm_patched = True
    mod.__dict__["__getattr__"] = __getattr__
    for k, v in list(mod.__dict__.items()):  # names resolved before init()
        if _is_placeholder(v):
            setattr(mod, k, _standin(k, v))


def _patch(name):
    mod = sys.modules.get(name)
    if mod is None:
        return
    try:
        if name == "transformers":
            _patch_transformers(mod)
        elif name == "transformers.models.auto.auto_factory":
            _patch_classmethod(mod._BaseAutoModelClass)
        elif name == "transformers.modeling_utils":
            _patch_classmethod(mod.PreTrainedModel)
    except Exception as e:  # a new transformers layout must not break the import
        from . import _log
        _log.warn("could not hook %s (%s: %s); models load without rm_abstract" % (name, type(e).__name__, e))


# Plain classes, not importlib.abc subclasses: importing importlib.abc at
# every interpreter start costs more than the whole rest of init().
class _Loader:
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(self._name)

    def __getattr__(self, attr):  # get_resource_reader, is_package, ...
        return getattr(self._loader, attr)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCH:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def install():
    global _installed
    if not _installed:
        sys.meta_path.insert(0, _Finder())
        _installed = True
    for name in _WATCH:
        if name in sys.modules:
            _patch(name)
