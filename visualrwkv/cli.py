"""The ``visualrwkv`` command. Each subcommand lives in its own module and is imported lazily,
so ``visualrwkv --help`` stays fast and a missing optional extra only affects its command.

    visualrwkv quickstart                      # tiny model, synthetic data, CPU, end to end
    visualrwkv train --help                    # stage 1 / stage 2 training (original flags)
    visualrwkv chat --model_path M --vision_tower_name V --image IMG --prompt "..."
    visualrwkv demo | serve | eval | score | data {check,show,synth}
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional, Tuple

from visualrwkv.errors import UserError

# name -> (module, function, one-line help). Each function takes argv (list of str) and
# returns an exit code.
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "quickstart": ("visualrwkv.quickstart", "main", "train a tiny model on built-in synthetic data, evaluate it, chat"),
    "train": ("visualrwkv.train.cli", "main", "stage-1 / stage-2 training with the original train.py flags"),
    "chat": ("visualrwkv.generation.chat", "main", "ask questions about an image (one-shot or interactive)"),
    "demo": ("visualrwkv.serve.demo", "main", "Gradio web demo"),
    "serve": ("visualrwkv.serve.server", "main", "OpenAI-compatible HTTP server"),
    "eval": ("visualrwkv.eval.run", "main", "answer a benchmark's questions (batched greedy decoding)"),
    "score": ("visualrwkv.eval.score", "main", "score an answer file with the benchmark's official metric"),
    "data": ("visualrwkv.data.cli", "main", "check, show or synthesize LLaVA-format training data"),
    "convert": ("visualrwkv.checkpoint", "main", "inspect or convert a checkpoint (.pth <-> .safetensors)"),
}


def _usage() -> str:
    lines = ["usage: visualrwkv <command> [options]", "", "commands:"]
    for name, (_, _, helptext) in COMMANDS.items():
        lines.append(f"  {name:<11} {helptext}")
    lines += ["", "Run 'visualrwkv <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from visualrwkv import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"visualrwkv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
        return int(fn(argv[1:]) or 0)
    except UserError as e:
        print(f"visualrwkv {name}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = {"gradio": "demo", "fastapi": "serve", "uvicorn": "serve", "lightning": "train",
                 "deepspeed": "deepspeed", "wandb": "wandb", "lmms_eval": "lmms"}.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"visualrwkv {name}: error: this command needs the '{extra}' extra: pip install 'visualrwkv[{extra}]'",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
