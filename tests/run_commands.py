"""Run one script with several command lines in a single Python process, each as ``python SCRIPT ARGS...``
would run it, so that a test of many command lines pays the torch/NeMo import once.

    python tests/run_commands.py examples/infer.py < cases.json > results.json

``cases.json`` is a list of argument lists. Each run executes the script as ``__main__`` (``runpy``)
with its own ``sys.argv``; its stdout and stderr are captured at the file-descriptor level (C code
and loggers included). An exception that escapes the script is printed as Python would print it
(a traceback) with exit code 1. The result is one JSON list of ``{code, stdout, stderr}``.
"""
import json
import os
import runpy
import sys
import tempfile
import traceback


def run(script: str, args: list[str]) -> dict:
    """Exit code, stdout and stderr of ``python script *args``, run in this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return {"code": code, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
    script = sys.argv[1]
    results = [run(script, args) for args in json.load(sys.stdin)]
    print(json.dumps(results))
