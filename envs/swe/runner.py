"""The scorer's trusted half inside the scoring sandbox: prepare the repository, run the tests.

envs.swe.scoring copies this file into the sandbox's state directory (outside the repository)
and runs it with the sandbox's interpreter; nothing of it is imported from the repository. It
uses the standard library only and runs under Python 3.6+ (an instance's own interpreter runs
the tests).

`check CONFIG` only says that this interpreter can run the runner. `prepare CONFIG` applies the submitted patch (`git apply`, `git apply --recount`, then GNU
`patch` for patches with plain paths and no symlinks), resets every changed path that is test
machinery to the base commit (see `protected_reason`; a path the base lacks is deleted), applies
the hidden test patch, and writes what survived (paths, the lines they gained) to a JSON file.
No code of the repository runs in this step.

`unittest CONFIG -- ARGS` / `pytest CONFIG -- ARGS` run the tests as `python -m unittest ARGS`
/ `pytest ARGS` would, record every result with the runner's own result class / plugin, and
write a report to a path outside the repository, authenticated with a key that the runner reads
(and deletes) before any code of the repository is imported. The code under test runs in this
process, so the runner guards itself with an audit hook (Python 3.8+; nothing can remove or
reach it), which also keeps the results: the result class reports to it only through the
runner's own audit event, so nothing the code under test can reach leads to the results.
- refused: any access to the state directory but the report; writing, renaming or deleting a
  test file; and from a file the patch changed: starting a process, ctypes, gc's object walks,
  tracing, frame access, reading or importing a test module, compiling code under another
  file's name; results reported from changed code or past the result class;
- checked before every test and after the run: the framework's classes and functions
  (unittest's, pytest's, this runner's, builtins, import hooks) are unchanged or replaced only by
  code from files the patch did not change, each test's class and methods come from such files
  (or were there when the tests were loaded), expected failures were marked when loaded, and
  the test files on disk are unchanged (unittest mode imports test modules from a snapshot
  taken before the run);
- the report is written before any atexit handler could run, and the process then ends with
  os._exit: no report (a crash, os._exit, a hang) means no test passed.
Open: code that walks frames through attributes CPython does not audit (a generator's
gi_frame, f_back, f_locals) can reach the runner's locals; Python < 3.8 has no audit hook.
"""

import _thread
import collections
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tokenize

REPORT_MAGIC = "cwm-rl-swe-report 1"
TEST_DIRS = frozenset(("tests", "test", "testing"))
TEST_CONFIG = frozenset(
    (
        "conftest.py", "sitecustomize.py", "usercustomize.py", "pytest.ini", ".pytest.ini",
        "tox.ini", "setup.cfg", "pyproject.toml", "noxfile.py", ".gitattributes", ".gitmodules",
    )
)  # fmt: skip
ARTIFACTS = (".pth", ".pyc", ".pyo", ".so", ".pyd", ".dylib", ".dll", ".egg-link")
FRAMEWORK = frozenset(
    (
        "unittest", "pytest", "_pytest", "pluggy", "py", "doctest", "site", "sitecustomize",
        "usercustomize", "nose", "nose2", "coverage", "hypothesis", "iniconfig", "xdist",
    )
)  # fmt: skip
FALLBACK_STDLIB = (  # Python < 3.10 has no sys.stdlib_module_names
    "abc argparse ast atexit builtins codecs collections contextlib copy dataclasses dis "
    "encodings enum functools gc hashlib hmac importlib inspect io itertools json linecache "
    "logging math operator os pathlib pickle random re shutil signal string struct subprocess "
    "sys tempfile textwrap threading time tokenize traceback types typing warnings"
).split()
GIT = ("git", "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null")
GIT += ("-c", "core.quotePath=false", "--literal-pathspecs")
MAX_ADDED_LINES = 20000
CODE_SUFFIXES = (".py", ".pyw", ".pyi", ".pyx", ".pxd")


def protected_reason(path, new=True, base_top=()):
    """Why the relative path `path` is test machinery that a patch may not change (it is reset
    to the base commit), or None for source. `new`: the base commit lacks it; `base_top`: the
    base's top-level names (and src/ names), for new modules that shadow a framework module."""
    parts = path.split("/")
    name = parts[-1]
    if ".git" in parts:
        return "git metadata"
    if "__pycache__" in parts or name.endswith(ARTIFACTS):
        return "compiled code or import path file"
    if any(part.endswith((".egg-info", ".dist-info")) for part in parts):
        return "package metadata"
    if any(part in TEST_DIRS for part in parts):
        return "test directory"
    if name in TEST_CONFIG:
        return "test configuration"
    if name.endswith(".py") and (
        name.startswith("test_") or name.endswith("_test.py") or name in ("test.py", "tests.py")
    ):
        return "test file"
    if new:
        top = "/".join(parts[:2]) if parts[0] == "src" and len(parts) > 1 else parts[0]
        module = top.split("/")[-1].split(".")[0]
        shadowed = set(getattr(sys, "stdlib_module_names", FALLBACK_STDLIB)) | FRAMEWORK
        if top not in base_top and module in shadowed:
            return "shadows the module " + module
    return None


# ---------------------------------------------------------------------------------------------
# prepare: no code of the repository runs here


def run(argv):
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return done.returncode, done.stdout.decode("utf-8", "replace")


def git_lines(*args):
    code, out = run(GIT + args)
    if code != 0:
        raise RuntimeError("git " + " ".join(args) + " failed: " + out[-500:])
    return [p for p in out.split("\0") if p]


def unsafe_for_patch_tool(patch_path):
    """Why GNU patch may not apply this patch (it follows symlinks it creates); None if safe."""
    with open(patch_path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(("new file mode", "new mode", "old mode", "deleted file mode")):
            if "120000" in line:
                return "it creates a symlink"
        heads = ("--- ", "+++ ", "*** ", "diff ", "Index: ", "rename ", "copy ")
        if not line.startswith(heads):
            continue
        words = line.split("\t")[0].split()[1:]
        for word in words[1:] if line.startswith("diff ") else words[-1:]:
            if word.startswith('"'):
                return "a quoted file name"
            if word == "/dev/null":
                continue
            parts = word.split("/")
            if word.startswith("/") or ".." in parts or ".git" in parts:
                return "the path " + word
            for start in (0, 1):  # as written, and without a/ or b/
                for k in range(start + 1, len(parts) + 1):
                    if os.path.islink("/".join(parts[start:k])):
                        return "the path " + word + " passes a symlink"
    return None


def apply_patch(patch_path):
    """(applied, log, refused reason)."""
    log = []
    for extra in ((), ("--recount",)):
        code, out = run(GIT + ("apply", "--whitespace=nowarn") + extra + (patch_path,))
        log.append(out)
        if code == 0:
            return True, "".join(log), None
    why = unsafe_for_patch_tool(patch_path)
    if why is not None:
        return False, "".join(log), "not applied with patch: " + why
    argv = ["patch", "-p1", "-u", "--batch", "--forward", "--no-backup-if-mismatch"]
    code, out = run(argv + ["--reject-file=-", "-i", patch_path])
    log.append(out)
    return code == 0, "".join(log), None


def untracked():
    """{path: lstat signature} of the files git does not track (build outputs, ignored ones)."""
    found = {}
    for path in git_lines("ls-files", "--others", "-z"):
        st = os.lstat(path)
        found[path] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def changes(before):
    """{path: (tracked at base, status)} of the work tree against the base commit; untracked
    files count when they are new or differ from `before` (untracked() before the patch)."""
    found = {}
    entries = git_lines("diff", "HEAD", "--name-status", "--no-renames", "--no-ext-diff", "-z")
    for status, path in zip(entries[::2], entries[1::2]):
        found[path] = (True, status)
    now = untracked()
    for path, signature in now.items():
        if before.get(path) != signature:
            found[path] = (False, "M" if path in before else "A")
    for path in before:
        if path not in now:
            found[path] = (False, "D")
    return found


def protected_changes(found, config, base_top):
    hidden = set(config["test_files"])
    exempt = set(config.get("exempt", ())) - hidden  # paths the oracle patch changes
    protected = {}
    for path, (tracked, _) in found.items():
        if os.path.islink(path):
            protected[path] = "symlink"
        elif path in hidden:
            protected[path] = "hidden test file"
        else:
            reason = protected_reason(path, new=not tracked, base_top=base_top)
            if reason is not None and (path not in exempt or reason == "git metadata"):
                protected[path] = reason
    return protected


def remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    parent = os.path.dirname(path)
    while parent and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)
        parent = os.path.dirname(parent)


def reset(protected, found):
    """Back to the base commit: links first, then new paths deleted, then tracked ones checked
    out from HEAD. Returns the protected files the base commit lacks but had (untracked): they
    cannot be restored."""
    lost = [p for p in protected if not found[p][0] and found[p][1] != "A"]
    order = sorted(protected, key=lambda p: (not os.path.islink(p), p.count("/"), p))
    tracked = [p for p in order if found[p][0]]
    for path in order:
        if os.path.lexists(path) and (os.path.islink(path) or not found[path][0]):
            remove(path)
    for k in range(0, len(tracked), 100):
        for path in tracked[k : k + 100]:
            if os.path.lexists(path) and (os.path.islink(path) or os.path.isdir(path)):
                remove(path)
        code, out = run(GIT + ("checkout", "-q", "HEAD", "--") + tuple(tracked[k : k + 100]))
        if code != 0:
            raise RuntimeError("resetting protected paths failed: " + out[-500:])
    return lost


def decode(path, data):
    """The text of a changed file as Python would read it (PEP 263), or None if undecodable."""
    if path.endswith(CODE_SUFFIXES) or data.startswith(b"#!"):
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
            return data.decode(encoding)
        except (SyntaxError, LookupError, UnicodeDecodeError):
            return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def added_lines(path, tracked):
    """The lines `path` has that its base version lacks (None if it cannot be read as text)."""
    if os.path.islink(path) or not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        new = decode(path, f.read())
    old = ""
    if tracked:
        done = subprocess.run(GIT + ("show", "HEAD:" + path), stdout=subprocess.PIPE)
        old = decode(path, done.stdout) or ""
    if new is None:
        return None
    extra = collections.Counter(new.splitlines()) - collections.Counter(old.splitlines())
    return [line for line in new.splitlines() if extra.pop(line, 0)]


def prepare(config):
    """Apply, reset, apply the hidden tests; write the outcome to config['prepared']."""
    out = {"applied": True, "log": "", "refused": None, "reset": [], "changed": []}
    out.update({"added": {}, "undecodable": [], "error": None, "test_patch": True})
    os.chdir(config["repo"])
    try:
        before = untracked()
        patch = config["model_patch"]
        if os.path.exists(patch) and os.path.getsize(patch):
            out["applied"], out["log"], out["refused"] = apply_patch(patch)
        if out["applied"]:
            base_top = set(git_lines("ls-tree", "-z", "--name-only", "HEAD"))
            if "src" in base_top:
                base_top |= {
                    "src/" + n for n in git_lines("ls-tree", "-z", "--name-only", "HEAD:src")
                }
            found = changes(before)
            protected = protected_changes(found, config, base_top)
            lost = reset(protected, found)
            out["reset"] = sorted([p, why] for p, why in protected.items())
            if lost:
                out["applied"] = False
                out["refused"] = "it changes files the base commit does not track: " + ", ".join(
                    lost
                )
            found = changes(before)
            left = protected_changes(found, config, base_top)
            if left and not lost:
                raise RuntimeError("protected paths survived the reset: " + ", ".join(left))
            out["changed"] = sorted(p for p, (_, status) in found.items() if status != "D")
            total = 0
            for path in out["changed"]:
                lines = added_lines(path, found[path][0])
                if lines is None:
                    out["undecodable"].append(path)
                elif total < MAX_ADDED_LINES:
                    out["added"][path] = lines[: MAX_ADDED_LINES - total]
                    total += len(out["added"][path])
        test_patch = config["test_patch"]
        if out["applied"] and os.path.exists(test_patch) and os.path.getsize(test_patch):
            code, log = run(GIT + ("apply", "--whitespace=nowarn", test_patch))
            out["test_patch"] = code == 0
            out["log"] += log
    except (OSError, RuntimeError, ValueError) as e:
        out["error"] = type(e).__name__ + ": " + str(e)
    with open(config["prepared"], "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------
# The guard around the code under test

EVENT = "cwm-rl.runner"  # the runner's own audit event: its result class reports through it
CODE = type(protected_reason.__code__)
STDLIB = os.path.dirname(os.__file__)
INSPECT = frozenset((os.path.join(STDLIB, "inspect.py"),))
FILE_HELPERS = frozenset(
    os.path.join(STDLIB, name)
    for name in ("pathlib.py", "io.py", "_pyio.py", "codecs.py", "tokenize.py", "linecache.py")
)
IMPORT_HELPERS = frozenset(
    ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
) | {os.path.join(STDLIB, "importlib", "__init__.py")}
TWO_PATHS = frozenset(
    ("os.rename", "os.replace", "os.symlink", "os.link", "shutil.copyfile", "shutil.move",
     "shutil.copytree")
)  # fmt: skip
AUDITED = {
    "open": "path", "os.listdir": "path", "os.scandir": "path", "os.rename": "path",
    "os.replace": "path", "os.remove": "path", "os.rmdir": "path", "os.symlink": "path",
    "os.link": "path", "os.truncate": "path", "os.chmod": "path", "os.utime": "path",
    "os.mkdir": "path", "shutil.copyfile": "path", "shutil.rmtree": "path",
    "shutil.move": "path", "shutil.copytree": "path", "import": "import", "compile": "compile",
    "sys._getframe": "frames", "sys._current_frames": "frames", "object.__getattr__": "attr",
    "gc.get_objects": "immediate", "gc.get_referrers": "immediate",
    "gc.get_referents": "immediate", "sys.settrace": "immediate", "sys.setprofile": "immediate",
    "sys.addaudithook": "immediate", "code.__new__": "immediate", "function.__new__": "immediate",
    "ctypes.dlopen": "immediate", "ctypes.dlsym": "immediate", "ctypes.call_function": "immediate",
    "ctypes.string_at": "immediate", "ctypes.addressof": "immediate",
    "ctypes.cdata": "immediate", "marshal.loads": "immediate",
    "subprocess.Popen": "stack", "os.system": "stack", "os.exec": "stack", "os.spawn": "stack",
    "os.posix_spawn": "stack", "os.fork": "stack", "os.forkpty": "stack", "pty.spawn": "stack",
    "os.kill": "stack", "os.killpg": "stack",
}  # fmt: skip
# Test modules import from the snapshot (unittest mode). Built in a namespace of its own, so the
# function (reachable as SourceFileLoader.get_data) leads to nothing but read-only data.
LOADER = """
def make(original, sources, tests, through, changed, getframe, emit, source_from_cache):
    def get_data(self, path):
        data = sources.get(path)
        if path in tests:
            frame = getframe(1)
            while frame is not None and (
                frame.f_code.co_filename in through or frame.f_code.co_filename[:1] == "<"
            ):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename in changed:
                emit("refused", "importing the test module " + path)
                raise ImportError("refused by the scoring runner: importing a test module")
        if data is not None:
            return data
        if path.endswith(".pyc"):
            try:
                cached = source_from_cache(path) in sources
            except ValueError:
                cached = False
            if cached:
                raise OSError("no cached bytecode for a test module")
        return original(self, path)
    return get_data
"""


class Guard:
    """The audit hook (which nothing can reach or remove): what the code under test may not do
    or change, the results the runner's result class reports to it, and what went wrong."""

    def __init__(self, config, runner, changed):
        self.repo = os.path.realpath(config["repo"])
        self.state = os.path.realpath(config["state_dir"]) + os.sep
        self.runner = os.path.realpath(runner)
        roots = {self.repo, os.path.abspath(config["repo"])}
        self.changed = frozenset(os.path.join(root, p) for root in roots for p in changed)
        self.violations, self.errors = [], []
        self.outcomes = collections.OrderedDict()  # test id -> outcome ("run", "dup" ...)
        self.ran = 0
        self.files = {}  # protected file -> sha256 at the start
        self.sources = {}  # protected .py file -> its bytes at the start
        self.tests, self.test_modules = set(), set()  # test modules' files and names
        self.framework = {}  # (owner, name) -> value before any code of the repository ran
        self.loaded = {}  # test class -> its attributes once the tests were loaded
        self.expected_failures = set()  # tests so marked when they were loaded
        self.finders, self.emitters, self.file_cache, self.busy = [], set(), {}, set()
        self.armed = False
        self.test_id = str
        self.getframe, self.get_ident = sys._getframe, _thread.get_ident
        self.realpath, self.abspath, self.isfile = os.path.realpath, os.path.abspath, os.path.isfile

    def snapshot_files(self, hidden):
        for directory, dirs, names in os.walk(self.repo):
            dirs[:] = [d for d in dirs if d != ".git"]
            for name in names:
                full = os.path.join(directory, name)
                relative = os.path.relpath(full, self.repo).replace(os.sep, "/")
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                if relative not in hidden and protected_reason(relative, new=False) is None:
                    continue
                with open(full, "rb") as f:
                    data = f.read()
                self.files[full] = hashlib.sha256(data).hexdigest()
                if name.endswith(".py"):
                    self.sources[full] = data
                if relative in hidden or protected_reason(relative) == "test file":
                    self.tests.add(full)
                    module = relative[:-3].replace("/", ".")
                    self.test_modules.add(module[:-9] if module.endswith(".__init__") else module)

    def changed_files(self):
        """Protected files whose content differs from the snapshot."""
        differ = []
        for path, digest in sorted(self.files.items()):
            try:
                with open(path, "rb") as f:
                    same = hashlib.sha256(f.read()).hexdigest() == digest
            except OSError:
                same = False
            if not same:
                differ.append(os.path.relpath(path, self.repo))
        return differ

    def serve_sources(self, emit):
        import importlib.machinery
        import importlib.util
        import types

        namespace = {"__builtins__": __builtins__}
        exec(LOADER, namespace)
        loader = importlib.machinery.SourceFileLoader
        get_data = namespace.pop("make")(
            loader.get_data, types.MappingProxyType(self.sources), frozenset(self.tests),
            IMPORT_HELPERS | {self.runner}, self.changed, sys._getframe, emit,
            importlib.util.source_from_cache,
        )  # fmt: skip
        self.emitters.add(get_data.__code__)
        loader.get_data = get_data

    def watch(self, modules, classes):
        """Remember the framework's functions and classes as they are now."""
        for module in modules:
            for name, value in list(vars(module).items()):
                self.framework[(module, name)] = value
                if isinstance(value, type) and value.__module__ == module.__name__:
                    classes.append(value)
        for cls in classes:
            for name, value in list(vars(cls).items()):
                self.framework[(cls, name)] = value
                self.emitters.add(getattr(value, "__code__", None))
        self.finders = list(sys.meta_path) + list(sys.path_hooks)

    def trusted_file(self, filename):
        """A real file that the patch did not change."""
        known = self.file_cache.get(filename)
        if known is None:
            full = self.abspath(os.path.join(self.repo, filename))
            known = self.isfile(full) and self.realpath(full) not in self.changed
            self.file_cache[filename] = known
        return known

    def code_file(self, value):
        """The file defining `value` (function, method, property, class); "" for data, None for
        other callables (builtins, callable instances)."""
        for _ in range(4):
            if isinstance(value, type) or isinstance(getattr(value, "__code__", None), CODE):
                break
            inner = [getattr(value, a, None) for a in ("__func__", "fget", "func")]
            inner = [i for i in inner if i is not None]
            if not inner:
                break
            value = inner[0]
        if isinstance(value, type):
            return getattr(sys.modules.get(value.__module__), "__file__", None)
        code = getattr(value, "__code__", None)
        if isinstance(code, CODE):
            return code.co_filename
        if callable(value) or hasattr(type(value), "__get__"):
            return None
        return ""

    def code_trusted(self, value):
        """Data, or Python code from a file the patch did not change."""
        filename = self.code_file(value)
        return filename == "" or filename is not None and self.trusted_file(filename)

    def from_changed(self, value):
        filename = self.code_file(value)
        return bool(filename) and self.realpath(self.abspath(filename)) in self.changed

    def framework_changes(self):
        found = []
        for (owner, name), old in self.framework.items():
            new = vars(owner).get(name, KeyError)
            if new is old:
                continue
            # data may become an instance (unittest's interrupt handler); code stays code
            data = self.code_file(old) == "" and self.code_trusted(type(new))
            if new is KeyError or not (self.code_trusted(new) or data):
                found.append("framework changed: " + owner.__name__ + "." + name)
        for finder in list(sys.meta_path) + list(sys.path_hooks):
            if not any(finder is known for known in self.finders):
                if self.from_changed(finder if isinstance(finder, type) else type(finder)):
                    found.append("import hook from changed code: " + repr(finder)[:100])
        return found

    def check_test(self, test):
        """Problems with one test: its class's code must come from files the patch did not
        change, and code present when the tests were loaded may only be replaced by such."""
        found = []
        for cls in type(test).__mro__[:-1]:
            watched = (cls, "__module__") in self.framework
            loaded = self.loaded.get(cls, {})
            for name, value in list(vars(cls).items()):
                old = (
                    self.framework.get((cls, name), KeyError)
                    if watched
                    else loaded.get(name, KeyError)
                )
                if old is value:
                    bad = not watched and self.from_changed(value)
                elif watched or self.code_file(old) not in ("", None):
                    bad = not self.code_trusted(value)
                else:
                    bad = self.from_changed(value) or self.from_changed(type(value))
                if bad:
                    found.append("test attribute from changed code: " + cls.__name__ + "." + name)
        for name, value in list(getattr(test, "__dict__", {}).items()):
            if hasattr(type(test), name) and not self.code_trusted(value):
                found.append("test attribute from changed code: " + name)
        return found

    def caller_changed(self, frame, through=frozenset(), strings=False):
        """Whether the code that called (past the standard-library helpers `through`, and with
        `strings` code compiled from strings, which counts as its caller's) is a file the patch
        changed."""
        while frame is not None and (
            frame.f_code.co_filename in through or strings and frame.f_code.co_filename[:1] == "<"
        ):
            frame = frame.f_back
        return frame is not None and frame.f_code.co_filename in self.changed

    def stack_changed(self, frame):
        while frame is not None:
            if frame.f_code.co_filename in self.changed:
                return True
            frame = frame.f_back
        return False

    def path_of(self, value):
        try:
            return self.realpath(self.abspath(os.fsdecode(value)))
        except (TypeError, ValueError):
            return None

    def audit(self, event, args):
        if not self.armed or (event not in AUDITED and event != EVENT):
            return
        thread = self.get_ident()
        if thread in self.busy:
            return
        self.busy.add(thread)
        try:
            if event == EVENT:
                self.runner_event(args, self.getframe(1))
                return
            why = self.judge(event, args, self.getframe(1))
        except Exception as e:  # noqa: BLE001 - a check that fails fails closed
            self.violations.append("the runner's check failed: " + type(e).__name__ + ": " + str(e))
            return
        finally:
            self.busy.discard(thread)
        if why:
            self.violations.append("refused " + event + ": " + why)
            raise PermissionError("refused by the scoring runner: " + why)

    def judge(self, event, args, caller):
        kind = AUDITED[event]
        if kind == "path":
            count = 2 if event in TWO_PATHS else 1
            writes = event != "open" or (args[1] is None and args[2] & 0o3103) or (
                args[1] is not None and set(str(args[1])) & set("wax+"))  # fmt: skip
            for value in args[:count]:
                path = self.path_of(value) if isinstance(value, (str, bytes)) else None
                if path is None:
                    continue
                if path.startswith(self.state) or path == self.state[:-1]:
                    if path != self.runner or writes:  # its traceback lines may be read
                        return "the scorer's files"
                if writes and path in self.files and self.stack_changed(caller):
                    return "a test file (" + os.path.relpath(path, self.repo) + ")"
                if path in self.tests and self.caller_changed(caller, FILE_HELPERS, True):
                    return "reading a test file (" + os.path.relpath(path, self.repo) + ")"
            return None
        if kind == "import":
            if args[0] in self.test_modules and self.caller_changed(caller, IMPORT_HELPERS, True):
                return "importing the test module " + args[0]
            return None
        if kind == "compile":
            name = args[1] if len(args) > 1 else None
            if isinstance(name, str) and name.endswith(".py") and name not in self.changed:
                return "compiling code as " + name if self.caller_changed(caller) else None
            return None
        if kind == "frames" or (kind == "attr" and type(args[0]).__name__ == "traceback"):
            return "frame access" if self.caller_changed(caller, INSPECT) else None
        if kind == "immediate":
            return "from changed code" if self.caller_changed(caller) else None
        if kind == "stack":
            return "from changed code" if self.stack_changed(caller) else None
        return None

    # -- what the runner's result class and plugin report (EVENT)

    def runner_event(self, args, emitter):
        """One report of the runner's result class; `emitter` must be one of its methods."""
        if emitter is not None and emitter.f_code not in self.emitters:
            self.violations.append("a result reported past the runner: " + repr(args)[:100])
            return
        kind, args = args[0], args[1:]
        if kind == "loaded":
            self.remember_tests(args[0])
        elif kind == "start":
            test, caller = args
            self.record(self.test_id(test), "start", caller)
            if isinstance(test, str):  # pytest: its node id; checked after the run
                return
            problems = self.check_test(test) + self.framework_changes()
            self.violations.extend(p for p in problems if p not in self.violations)
        elif kind == "result":
            test_id, outcome, caller = args
            if outcome == "xfail":
                outcome = "pass" if test_id in self.expected_failures else "fail"
                if outcome == "fail":
                    self.violations.append("expected failure marked after loading: " + test_id)
            self.record(test_id, outcome, caller)
        elif kind == "test-from":
            if self.from_changed(args[1]):
                self.violations.append("test from changed code: " + args[0])
        else:  # "error", "refused"
            (self.errors if kind == "error" else self.violations).append(args[0])

    def remember_tests(self, tests):
        for test in tests:
            method = getattr(test, getattr(test, "_testMethodName", ""), None)
            if any(
                getattr(m, "__unittest_expecting_failure__", False) for m in (method, type(test))
            ):
                self.expected_failures.add(self.test_id(test))
            for cls in type(test).__mro__[:-1]:
                if cls not in self.loaded and (cls, "__module__") not in self.framework:
                    self.loaded[cls] = dict(vars(cls))

    def record(self, test_id, outcome, caller):
        """`caller`: the frame that reported it, which must be framework code or the tests'."""
        if not self.trusted_file(caller.f_code.co_filename):
            self.violations.append("result reported from changed code: " + test_id)
            return
        previous = self.outcomes.get(test_id)
        if outcome == "start":
            self.ran += 1
            self.outcomes[test_id] = "dup" if previous is not None else "run"
        elif previous is None:
            self.errors.append(outcome + " without a start: " + test_id)
        elif previous == "run" or (outcome == "fail" and previous in ("pass", "skip")):
            self.outcomes[test_id] = outcome


# ---------------------------------------------------------------------------------------------
# The result class, the plugin and the report


def unittest_runner(unittest, emit, getframe, stderr):
    """The runner class for unittest.main, the result class and the test id function. Results
    go to the guard through `emit` only: nothing here leads to it."""

    def test_id(test):
        method = getattr(test, "_testMethodName", None)
        if method is None or not isinstance(test, unittest.TestCase):
            return str(test)
        return type(test).__module__ + "." + type(test).__qualname__ + "." + method

    def each(suite):
        for test in suite:
            if isinstance(test, unittest.TestSuite):
                yield from each(test)
            else:
                yield test

    class Recorder(unittest.TestResult):
        def startTest(self, test):
            emit("start", test, getframe(1))
            super().startTest(test)
            stderr.write(test_id(test) + " ... ")

        def report(self, test, outcome, caller, detail=""):
            if isinstance(test, unittest.TestCase):
                emit("result", test_id(test), outcome, caller)
            else:  # a module or class fixture failed or was skipped: its tests do not run
                emit("error", outcome + ": " + str(test))
            stderr.write(outcome + "\n" + detail)

        def addSuccess(self, test):
            self.report(test, "pass", getframe(1))

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self.report(test, "fail", getframe(1), self.failures[-1][1])

        def addError(self, test, err):
            super().addError(test, err)
            self.report(test, "fail", getframe(1), self.errors[-1][1])

        def addSkip(self, test, reason):
            self.report(test, "skip", getframe(1))

        def addExpectedFailure(self, test, err):
            self.report(test, "xfail", getframe(1))

        def addUnexpectedSuccess(self, test):
            self.report(test, "fail", getframe(1))

        def addSubTest(self, test, subtest, err):
            if err is not None:
                super().addSubTest(test, subtest, err)
                self.report(test, "fail", getframe(1), str(subtest) + "\n")

    class Runner:
        def __init__(self, **options):
            self.options = options

        def run(self, test):
            emit("loaded", list(each(test)))
            result = Recorder()
            result.failfast = bool(self.options.get("failfast"))
            result.buffer = bool(self.options.get("buffer"))
            result.startTestRun()
            try:
                test(result)
            finally:
                result.stopTestRun()
            return result

    return Runner, Recorder, test_id


def pytest_plugin(emit, getframe):
    """A pytest plugin reporting through `emit` (pass, fail, skip; xfail passes)."""

    class Recorder:
        def pytest_runtest_setup(self, item):
            emit("test-from", item.nodeid, getattr(item, "obj", None))

        def pytest_runtest_logreport(self, report):
            caller, when = getframe(1), report.when
            if when == "setup":
                emit("start", report.nodeid, caller)
            outcome = "pass" if report.passed else "fail" if report.failed else "skip"
            if hasattr(report, "wasxfail"):
                outcome = "pass" if report.skipped else "fail"
            if when == "call" or outcome == "fail" or (when == "setup" and report.skipped):
                emit("result", report.nodeid, outcome, caller)

        def pytest_collectreport(self, report):
            if report.failed:
                emit("error", "collection failed: " + report.nodeid)

    return Recorder()


def hmac_sha256(key, data, sha256=hashlib.sha256):
    key = key + b"\0" * (64 - len(key))
    inner = sha256(bytes(b ^ 0x36 for b in key) + data).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).hexdigest()


def report_text(mode, guard, violations, complete, audit, key, mac=hmac_sha256):
    def one_line(text):
        return " ".join(str(text).split())[:500]

    lines = [REPORT_MAGIC, "mode " + mode, "audit " + str(int(audit))]
    lines += ["complete " + str(int(complete)), "ran " + str(guard.ran)]
    lines += ["error " + one_line(e) for e in guard.errors]
    lines += ["violation " + one_line(v) for v in violations]
    for test_id, outcome in guard.outcomes.items():
        lines.append("test " + ("fail" if outcome == "run" else outcome) + " " + one_line(test_id))
    body = "\n".join(lines) + "\n"
    return body + "mac " + mac(key, body.encode("utf-8")) + "\n"


def run_tests(mode, config_path, args):
    """Run the tests guarded, write the report, and end the process with os._exit."""
    write, os_open, os_close, os_exit, make_report = (
        os.write,
        os.open,
        os.close,
        os._exit,
        report_text,
    )
    getframe = sys._getframe
    with open(config_path) as f:
        config = json.load(f)
    with open(config["key"], "rb") as f:
        key = f.read().strip()
    os.unlink(config["key"])
    with open(config["prepared"]) as f:
        guard = Guard(config, __file__, json.load(f)["changed"])
    guard.snapshot_files(set(config["test_files"]))
    import builtins
    import functools
    import importlib.machinery
    import unittest

    audit = hasattr(sys, "addaudithook")
    if audit:
        emit = functools.partial(sys.audit, EVENT)
    else:  # Python < 3.8: the runner's reports reach the guard directly

        def emit(*args):
            guard.runner_event(args, None)

    classes = [importlib.machinery.SourceFileLoader, importlib.machinery.FileFinder]
    if mode == "unittest":
        guard.serve_sources(emit)
        runner, recorder, guard.test_id = unittest_runner(unittest, emit, getframe, sys.stderr)
        classes += [recorder, runner]
    else:
        import pytest

        plugin = pytest_plugin(emit, getframe)
        classes.append(type(plugin))
    roots = ("unittest", "_pytest", "pytest", "pluggy")
    modules = {n: m for n, m in list(sys.modules.items()) if n.split(".")[0] in roots and m}
    guard.watch(list(modules.values()) + [builtins], classes)
    if config.get("cwd_on_path"):
        sys.path.insert(0, guard.repo)
    sys.argv = ["python -m unittest" if mode == "unittest" else "pytest"] + list(args)
    sys.modules["__main__"] = type(sys)("__main__")  # nothing leads back to this module
    if audit:
        sys.addaudithook(guard.audit)
    complete = False
    guard.armed = True
    try:
        if mode == "unittest":
            unittest.main(module=None, argv=sys.argv, testRunner=runner, exit=False)
        else:
            pytest.main(list(args), plugins=[plugin])
        complete = True
    except BaseException as e:  # noqa: B036 - the tests may raise anything, SystemExit too
        guard.errors.append("the test run stopped: " + type(e).__name__ + ": " + str(e))
    guard.armed = False
    violations = list(guard.violations) + guard.framework_changes()
    violations += ["test file changed during the run: " + p for p in guard.changed_files()]
    for name, module in modules.items():
        if sys.modules.get(name) is not module:
            violations.append("framework module replaced: " + name)
    text = make_report(mode, guard, sorted(set(violations)), complete, audit, key)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        fd = os_open(config["report"], flags, 0o600)
        write(fd, text.encode("utf-8"))
        os_close(fd)
    finally:
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - the report is written; nothing else matters
                pass
        os_exit(0)


def main(argv):
    mode, config_path = argv[1], argv[2]
    args = argv[4:] if len(argv) > 3 and argv[3] == "--" else argv[3:]
    if mode == "prepare":
        with open(config_path) as f:
            prepare(json.load(f))
        return 0
    if mode == "check":  # the test command's interpreter can run the runner (imports nothing)
        with open(config_path) as f:
            json.load(f)
        print("cwm-rl-runner ok " + sys.version.split()[0])
        return 0
    if mode not in ("unittest", "pytest"):
        raise SystemExit("usage: runner.py prepare|check|unittest|pytest CONFIG [-- ARGS]")
    del sys.path[0]  # this file's directory
    run_tests(mode, config_path, args)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
