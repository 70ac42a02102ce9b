"""Catching transformers' model loading without importing transformers.

init() must be cheap (it runs at every interpreter start in an injected pod),
so instead of importing transformers we put a finder on sys.meta_path that
patches the relevant modules right after they are first imported. If they are
already imported, we patch them at once: the order of `import transformers`
and `init()` does not matter.

What is caught: `from_pretrained` of every model class.
- with torch: `_BaseAutoModelClass.from_pretrained` (every AutoModel* class)
  and `PreTrainedModel.from_pretrained` (every concrete model class). The
  patch is on the base classes, so a class the script imported before init()
  is caught too.
- without torch, transformers exports placeholder classes (metaclass
  DummyObject) that raise "requires PyTorch" on any use. They are patched in
  place, wherever the script holds them: their metaclass is swapped for a
  subclass that lets `from_pretrained`/`from_config` through, so a placeholder
  imported before init() loads through the agent as well.
Then `model.classify` decides: a causal language model goes to the agent;
any other class (sequence-to-sequence, classifiers, encoders, vision, ...) is
one the agent cannot serve, and `RM_ON_UNAVAILABLE` decides (an error that
says so, or one line and transformers' own loader in this process).
"""
from __future__ import annotations

import sys
import threading

_WATCH = ("transformers", "transformers.models.auto.auto_factory", "transformers.models.auto.modeling_auto",
          "transformers.modeling_utils")
_local = threading.local()  # set while a fallback runs transformers' own loader
_installed = False


def _intercept(cls, name, args, kwargs, original):
    """Common path of every patched from_pretrained."""
    from . import _state
    from .model import load

    if getattr(_local, "inside", False) or not _state.active:
        return original(name, *args, **kwargs)

    def fallback(n, **kw):
        _local.inside = True  # transformers' loader calls from_pretrained of other classes
        try:
            return original(n, *args, **kw)
        finally:
            _local.inside = False
    return load(_state, cls.__name__, name, kwargs, fallback)


def _patch_classmethod(cls, attr="from_pretrained"):
    orig = cls.__dict__.get(attr)
    func = getattr(orig, "__func__", None)
    if func is None or getattr(func, "_rm_patched", False):
        return

    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        return _intercept(klass, pretrained_model_name_or_path, args, kwargs,
                          lambda n, *a, **k: func(klass, n, *a, **k))
    from_pretrained.__doc__ = func.__doc__
    from_pretrained._rm_patched = True  # never wrap twice
    setattr(cls, attr, classmethod(from_pretrained))


def _patch_auto_classes(base):
    """transformers gives each AutoModel* class its own copy of
    from_pretrained (so that its docstring names the class): the base
    class's alone is not enough."""
    todo = [base]
    while todo:
        cls = todo.pop()
        _patch_classmethod(cls)
        todo.extend(cls.__subclasses__())


# -- torch-free: transformers' placeholders, patched in place ---------------------

_OURS = ("from_pretrained", "from_config", "_rm_standin")
_metas = {}  # DummyObject (transformers' metaclass) -> our subclass of it


def _standin_meta(dummy_meta):
    """A subclass of transformers' DummyObject metaclass that lets our two
    class methods through; every other attribute still raises transformers'
    own "requires PyTorch" error."""
    meta = _metas.get(dummy_meta)
    if meta is None:
        def __getattribute__(cls, key):
            if key in _OURS:
                return type.__getattribute__(cls, key)
            return dummy_meta.__getattribute__(cls, key)
        meta = type("RMStandin" + dummy_meta.__name__, (dummy_meta,), {"__getattribute__": __getattribute__})
        _metas[dummy_meta] = meta
    return meta


def _is_model_placeholder(v):
    if type(v).__name__ != "DummyObject" or not isinstance(v, type):
        return False
    name = v.__name__
    return (name.startswith("AutoModel") or "For" in name or name.endswith("Model")
            or name.endswith("LMHeadModel") or name.endswith("WithLMHead"))


def _patch_placeholder(v):
    """Turns the placeholder class itself into a stand-in (so every holder
    of it sees the change): from_pretrained loads through the agent."""
    if not _is_model_placeholder(v):
        return
    try:
        dummy_meta = type(v)
        v.__class__ = _standin_meta(dummy_meta)

        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            def original(n, *a, **k):  # the placeholder's: transformers' "requires PyTorch" error
                dummy_meta.__getattribute__(cls, "from_pretrained")
            return _intercept(cls, pretrained_model_name_or_path, args, kwargs, original)

        def from_config(cls, *a, **k):
            raise NotImplementedError("rm_abstract: %s.from_config() builds weights in this process and needs torch; "
                                      "use from_pretrained() to run the model in the node agent" % cls.__name__)
        type.__setattr__(v, "from_pretrained", classmethod(from_pretrained))
        type.__setattr__(v, "from_config", classmethod(from_config))
        type.__setattr__(v, "_rm_standin", True)
    except TypeError:  # a layout we do not know: leave it to transformers
        pass


def _patch_placeholders_in(mod):
    for v in list(vars(mod).values()):
        if type(v).__name__ == "DummyObject":
            _patch_placeholder(v)


def _patch_lazy_module(mod):
    # transformers' top level (and each models.* package) is a _LazyModule
    # resolving names on access; a module-level __getattr__ in its __dict__
    # is consulted before the class's own, so we see each placeholder as it
    # is first resolved.
    d = mod.__dict__
    if "__getattr__" in d and getattr(d["__getattr__"], "_rm_patched", False):
        return
    lazy_getattr = getattr(type(mod), "__getattr__", None)
    if lazy_getattr is None:
        return

    def __getattr__(name):
        v = lazy_getattr(mod, name)
        if type(v).__name__ == "DummyObject":
            _patch_placeholder(v)
        return v
    __getattr__._rm_patched = True
    d["__getattr__"] = __getattr__


def _patch_transformers(mod):
    _patch_lazy_module(mod)
    # Placeholders resolved before init(): the lazy modules cache what they
    # resolved in their own __dict__, and these are the very objects the
    # script holds.
    for name, m in list(sys.modules.items()):
        if m is not None and (name == "transformers" or name.startswith("transformers.")):
            if type(m).__name__ == "_LazyModule":
                _patch_lazy_module(m)
            _patch_placeholders_in(m)


def _patch(name):
    mod = sys.modules.get(name)
    if mod is None:
        return
    try:
        if name == "transformers":
            _patch_transformers(mod)
        elif name == "transformers.models.auto.auto_factory":
            _patch_auto_classes(mod._BaseAutoModelClass)
        elif name == "transformers.models.auto.modeling_auto":
            _patch_auto_classes(sys.modules["transformers.models.auto.auto_factory"]._BaseAutoModelClass)
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
