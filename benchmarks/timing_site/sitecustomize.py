"""Per-function wall and CPU time, and GC pauses, inside every Python process started with this directory
first on PYTHONPATH (Python imports ``sitecustomize`` at start-up): the attribution behind the README's
"where the plugin's milliseconds go" (issue 12).  A measuring aid, not part of the plugin.

    PYTHONPATH=benchmarks/timing_site ROUTENLP_TIMING_DIR=/tmp/timing \\
    ROUTENLP_TIMING_WRAP="litellm_routenlp.plugin:RouteNLPCallback.*;litellm_routenlp.decision_log:DecisionLog.*" \\
    ROUTENLP_GC_STATS=1 .venv/bin/python benchmarks/proxy_overhead.py --configs plain routenlp --concurrency 1 \\
        --duration 10 --open-rates
    .venv/bin/python benchmarks/timing_site/show.py /tmp/timing

``ROUTENLP_TIMING_WRAP`` is a ``;``-separated list of ``module:function``, ``module:Class.method`` or
``module:Class.*``.  Each call's ``time.perf_counter`` (wall) and ``time.thread_time`` (CPU of the calling
thread) are summed per target and written to ``<dir>/wrap-<pid>.json``.  A coroutine's figures include
whatever the event loop ran while it was suspended: compare a coroutine with the synchronous parts it calls.
``ROUTENLP_GC_STATS`` adds ``<dir>/<pid>.json``: collections and pause milliseconds per generation
(``gc.callbacks``).
"""
import os, sys
if os.environ.get("ROUTENLP_GC_STATS") and os.environ.get("ROUTENLP_TIMING_DIR"):
    import gc, json, time
    _d = os.environ["ROUTENLP_TIMING_DIR"]
    _st = {"argv": sys.argv[:3], "n": [0, 0, 0], "ms": [0.0, 0.0, 0.0], "max": [0.0, 0.0, 0.0], "pauses": [[], [], []]}
    _t0 = [0.0]; _count = [0]
    def _cb(phase, info):
        g = info["generation"]
        if phase == "start":
            _t0[0] = time.perf_counter(); return
        ms = (time.perf_counter() - _t0[0]) * 1e3
        _st["n"][g] += 1; _st["ms"][g] += ms
        if ms > _st["max"][g]: _st["max"][g] = ms
        if ms > 1.0: _st["pauses"][g].append(round(ms, 2))
        _count[0] += 1
        if _count[0] % 100 == 0 or g == 2:
            with open(os.path.join(_d, f"{os.getpid()}.json"), "w") as f:
                json.dump(_st, f)
    gc.callbacks.append(_cb)

if os.environ.get("ROUTENLP_TIMING_WRAP") and os.environ.get("ROUTENLP_TIMING_DIR"):
    import time as _time, json as _json, functools as _ft, inspect as _inspect, importlib as _il
    _hd = os.environ["ROUTENLP_TIMING_DIR"]
    _hs = {}; _calls = [0]
    def _dump():
        with open(os.path.join(_hd, f"wrap-{os.getpid()}.json"), "w") as f:
            _json.dump({"argv": sys.argv[:3], "stats": _hs}, f)
    def _rec(name, t0, c0):
        s = _hs.setdefault(name, [0, 0.0, 0.0]); s[0] += 1
        s[1] += (_time.perf_counter() - t0) * 1e3; s[2] += (_time.thread_time() - c0) * 1e3
        _calls[0] += 1
        if _calls[0] % 500 == 0: _dump()
    def _wrap(name, fn):
        if _inspect.iscoroutinefunction(fn):
            @_ft.wraps(fn)
            async def w(*a, **k):
                t0 = _time.perf_counter(); c0 = _time.thread_time()
                try: return await fn(*a, **k)
                finally: _rec(name, t0, c0)
        else:
            @_ft.wraps(fn)
            def w(*a, **k):
                t0 = _time.perf_counter(); c0 = _time.thread_time()
                try: return fn(*a, **k)
                finally: _rec(name, t0, c0)
        return w
    for _target in os.environ["ROUTENLP_TIMING_WRAP"].split(";"):
        try:
            _mod, _qual = _target.split(":")
            _m = _il.import_module(_mod)
            _parts = _qual.split(".")
            if len(_parts) == 1:
                setattr(_m, _parts[0], _wrap(_target, getattr(_m, _parts[0])))
                continue
            _cls = getattr(_m, _parts[0])
            names = [n for n in vars(_cls) if not n.startswith("__")] if _parts[1] == "*" else [_parts[1]]
            for _n in names:
                raw = vars(_cls)[_n]
                if isinstance(raw, staticmethod):
                    setattr(_cls, _n, staticmethod(_wrap(f"{_parts[0]}.{_n}", raw.__func__)))
                elif isinstance(raw, classmethod) or isinstance(raw, property) or not callable(raw):
                    continue
                else:
                    setattr(_cls, _n, _wrap(f"{_parts[0]}.{_n}", raw))
        except Exception as e:
            sys.stderr.write(f"timing_site: cannot wrap {_target}: {e!r}\n")
