"""rm_abstract's sitecustomize, put on PYTHONPATH by the admission webhook.

Python imports the first `sitecustomize` on sys.path at start-up. This one:
1. runs the image's own sitecustomize, if any (we must not hide it);
2. if RM_INJECTED=1, calls rm_abstract's init from the environment.
When RM_INJECTED is not 1 it only does step 1: one dict lookup, nothing
imported. Nothing here may break the user's program: every failure is one
line on stderr and the program continues as it would have without us.
Kept to Python 3.6 syntax so that even an unsupported interpreter only
gets a line saying so, never a SyntaxError.
"""
import os
import sys


def _rm_line(msg):
    try:
        sys.stderr.write("rm_abstract: " + msg + "\n")
    except Exception:
        pass


def _rm_chain():
    """Execute the next sitecustomize on sys.path (the image's), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        import importlib.machinery
        import importlib.util
        rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        # while it runs it *is* sitecustomize (some check sys.modules)
        ours = sys.modules.get("sitecustomize")
        sys.modules["sitecustomize"] = module
        try:
            spec.loader.exec_module(module)
        finally:
            if ours is not None:
                sys.modules["sitecustomize"] = ours
        # its public names stay reachable as `sitecustomize.<name>`
        g = globals()
        for k, v in vars(module).items():
            if not k.startswith("__") and k not in g:
                g[k] = v
    except Exception as e:
        _rm_line("the image's sitecustomize failed (%s: %s); continuing" % (type(e).__name__, e))


def _rm_main():
    _rm_chain()
    if os.environ.get("RM_INJECTED") != "1":
        return
    if sys.version_info < (3, 9):
        _rm_line("not active: Python %d.%d is older than 3.9; the program runs without rm_abstract" % sys.version_info[:2])
        return
    try:
        import rm_abstract
        rm_abstract._init_from_env()
    except Exception as e:  # anything else: say so once, run as if not injected
        _rm_line("not active (%s: %s); the program runs without rm_abstract" % (type(e).__name__, e))


_rm_main()
