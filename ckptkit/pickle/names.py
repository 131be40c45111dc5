"""Global names: Python 2 remapping, and how each name is classified.

**Remapping.** For protocols below 3, ``pickle.Unpickler(fix_imports=True)`` (the default, and
what ``torch.load`` gets) rewrites Python 2 names through the ``_compat_pickle`` tables before
importing; this module applies the same tables, so ``__builtin__.eval`` is ``builtins.eval`` and
``commands.getoutput`` is ``subprocess.getoutput``.

**Classification** (``GlobalUse.classification``):

- ``"tensor-rebuild"`` / ``"vetted"``: the entries of :mod:`ckptkit.pickle.vetted`;
- ``"dangerous"``: a name that, if a normal unpickler resolved it, runs code, reaches other
  code, or touches processes, files or the network. It draws on ``safe-loading.md``: the
  "Never allow" table of §3 (``os``/``posix``/``nt``/``sys``/``subprocess``, ``builtins.eval``,
  ``exec``, ``compile``, ``__import__``, ``open``, ``getattr``, nested loaders such as
  ``pickle.loads``, ``torch.load`` and ``torch.storage._load_from_bytes``, dotted and dunder
  names) and the gadget zoo of §4 item 4 (``importlib``, ``functools.partial``, ``operator``
  getters, ``pydoc.locate``, ``pkgutil.resolve_name``, ``runpy``, ``cProfile``, ``timeit``,
  ``pip``, ``types.CodeType``, ``logging.FileHandler``, ``_io.FileIO``, ``_posixsubprocess``,
  ``multiprocessing``, ``asyncio`` subprocess transports, ``torch.utils.collect_env.run``,
  ``torch._inductor``, ``numpy.f2py``, ``ssl``, ``urllib``, ``webbrowser``). Whole modules are
  listed where no member belongs in a checkpoint and the members that matter are too many to
  enumerate (every ``functools`` and ``operator`` entry exists to call or reach into something;
  ``torch._C`` and ``torch.jit`` load and compile code); single names where the rest of the
  module is ordinary data (``builtins``, ``uuid``, ``io``);
- ``"unknown"``: everything else, including classes that merely need code to load, such as
  ``torch.nn.modules`` layers from full-model saves or ``TrainingArguments`` (§3 lists them as
  never allowed, not as hostile).

"dangerous" is a severity for reports; safety never depends on it, because nothing is ever
imported or called: an "unknown" name is not trusted either.
"""

from __future__ import annotations

import _compat_pickle

from ckptkit.pickle.values import Classification, GlobalRef
from ckptkit.pickle.vetted import lookup

# Modules whose every member, and every submodule, is dangerous.
_DANGEROUS_MODULES = frozenset(
    (
        # processes, the interpreter, imports, code objects
        *("os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "_posixsubprocess", "pty"),
        *("commands", "multiprocessing", "asyncio", "signal", "resource", "gc", "importlib", "imp"),
        *("zipimport", "pkgutil", "runpy", "code", "codeop", "pydoc", "inspect", "marshal", "ctypes"),
        *("_ctypes", "cffi", "site", "sysconfig", "platform"),
        # nested unpicklers and object loaders
        *("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"),
        # calling and reaching into objects
        *("functools", "operator"),
        # debuggers and profilers run code they are given
        *("pdb", "bdb", "trace", "cProfile", "profile", "timeit", "doctest"),
        # files and network
        *("shutil", "tempfile", "logging", "socket", "ssl", "urllib", "urllib2", "http", "httplib"),
        *("ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc", "socketserver"),
        *("webbrowser", "requests"),
        # package managers and build tools install and run code
        *("pip", "setuptools", "distutils", "pkg_resources"),
        # torch and numpy entry points that load, compile or run code
        *("torch._C", "torch.jit", "torch.hub", "torch.package", "torch.ops", "torch.fx", "torch.export"),
        *("torch._export", "torch._inductor", "torch._dynamo", "torch.utils.cpp_extension"),
        *("torch.utils.collect_env", "numpy.f2py", "numpy.testing", "numpy.distutils", "numpy.ctypeslib"),
        "numpy.lib.npyio",
    )
)

# Single dangerous names in modules that are otherwise ordinary.
_DANGEROUS_NAMES = frozenset(
    (module, name)
    for module, names in {
        # Python 2's execfile, file, raw_input and reload matter under the __builtin__ alias.
        "builtins": "eval exec compile open getattr setattr delattr globals locals vars input "
        "breakpoint help exit quit execfile file raw_input reload",
        "types": "FunctionType LambdaType CodeType MethodType ModuleType",
        "io": "open open_code FileIO",
        "_io": "open open_code FileIO",
        "uuid": "_get_command_stdout _popen",
        "torch": "load compile",
        "torch.serialization": "load _load",
        "torch.storage": "_load_from_bytes",
        "numpy": "load loadtxt fromfile",
    }.items()
    for name in names.split()
)

# _compat_pickle.IMPORT_MAPPING sends __builtin__ to builtins only for protocol < 3; a protocol
# 3+ pickle naming __builtin__ fails to import under Python 3, but it is still an attempt.
_ALIASES = {"__builtin__": "builtins"}


def global_ref(module: str, name: str, protocol: int) -> GlobalRef:
    """The global ``module.name`` as an unpickler resolves it for a pickle of ``protocol``."""
    if protocol < 3:
        mapped = _compat_pickle.NAME_MAPPING.get((module, name))
        if mapped is not None:
            module, name = mapped
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return GlobalRef(module, name)


def classify(ref: GlobalRef) -> Classification:
    """How a report should treat a pickle's reference to ``ref``; see the module docstring."""
    entry = lookup(ref)
    if entry is not None:
        return entry.classification
    return "dangerous" if _is_dangerous(ref.module.strip(), ref.name.strip()) else "unknown"


def _is_dangerous(module: str, name: str) -> bool:
    # A dotted name walks attributes from the module (protocol 4 resolves "os.system" inside
    # pathlib to the real os.system); a dunder part reaches interpreter internals
    # (numpy.__builtins__). Neither appears in a checkpoint, so both count as dangerous.
    if "." in name or any(part.startswith("__") and part.endswith("__") for part in name.split(".")):
        return True
    module = _ALIASES.get(module, module)
    if (module, name) in _DANGEROUS_NAMES:
        return True
    return any(prefix in _DANGEROUS_MODULES for prefix in _prefixes(module))


def _prefixes(module: str) -> list[str]:
    """``["a", "a.b", "a.b.c"]`` for ``"a.b.c"``: a dangerous module taints its submodules."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
