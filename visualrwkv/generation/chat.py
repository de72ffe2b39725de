"""``visualrwkv chat``: ask about an image from the terminal.

One-shot when ``--prompt`` is given, otherwise an interactive multi-turn session with commands.
The answer streams as it is generated.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from visualrwkv.errors import UserError

EXAMPLE = ("visualrwkv chat --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth "
           "--vision_tower_name openai/clip-vit-large-patch14-336 --image photo.jpg "
           "--prompt \"What is unusual about this image?\"")

COMMANDS_HELP = """commands:
  /image PATH   load another image (starts a new conversation)
  /noimage      drop the image (text-only conversation)
  /reset        forget the conversation, keep the image
  /params       show the sampling settings
  /help         this list
  /quit         leave (Ctrl-D works too)"""


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by chat, demo and serve: which model, how to build prompts, where to run."""
    g = p.add_argument_group("model")
    g.add_argument("--model_path", required=True, help="VisualRWKV checkpoint (.pth or .safetensors)")
    g.add_argument("--vision_tower_name", required=True,
                   help="the CLIP tower the model was trained with: a hub name or a local folder")
    g.add_argument("--grid_size", type=int, default=-1,
                   help="image token pooling the model was trained with (-1 = all 577 tokens; default -1)")
    g.add_argument("--image_position", default="middle", choices=["first", "middle", "last"],
                   help="where the image goes in the prompt, as in training (default middle)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = fp32 on CPU, bf16 on GPU")
    add_compile_arg(g)


def add_compile_arg(g) -> None:
    g.add_argument("--compile", type=int, default=0, choices=[0, 1],
                   help="1: torch.compile the decoding step inside its CUDA graph (GPU only): 1.7x faster "
                        "batch-1 decoding on an H100; the first answer waits ~1 min to compile")


def compile_flag(args) -> bool:
    """--compile as a bool; one clear error when it cannot apply (no GPU)."""
    from visualrwkv.errors import UserError
    from visualrwkv.generation.pipeline import resolve_device

    compile = bool(getattr(args, "compile", 0))
    if compile and resolve_device(args.device).type != "cuda":
        raise UserError("--compile 1 needs a CUDA GPU (it compiles the GPU decoding step); drop it on a CPU")
    return compile


def add_sampling_args(p: argparse.ArgumentParser, chat_defaults: bool = True) -> None:
    from visualrwkv.generation.sampling import SamplingParams

    d = SamplingParams.chat() if chat_defaults else SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top_p", type=float, default=d.top_p, help=f"nucleus sampling mass (default {d.top_p})")
    g.add_argument("--top_k", type=int, default=d.top_k, help="keep the k most likely tokens, 0 = off (default 0)")
    g.add_argument("--presence_penalty", type=float, default=d.presence_penalty,
                   help=f"subtracted from tokens already generated (default {d.presence_penalty})")
    g.add_argument("--frequency_penalty", type=float, default=d.frequency_penalty,
                   help=f"times the token's decayed count (default {d.frequency_penalty})")
    g.add_argument("--penalty_decay", type=float, default=d.penalty_decay,
                   help=f"counts are multiplied by this every step (default {d.penalty_decay})")
    g.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens, help=f"default {d.max_new_tokens}")
    g.add_argument("--seed", type=int, default=None, help="fix the sampling seed")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")


def sampling_from_args(args):
    from visualrwkv.generation.sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                          top_p=args.top_p, top_k=args.top_k, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, penalty_decay=args.penalty_decay,
                          seed=args.seed).validate()


def load_pipeline_from_args(args, **kw):
    from visualrwkv.generation.pipeline import Pipeline

    compile = compile_flag(args)
    return Pipeline.load(args.model_path, args.vision_tower_name, grid_size=args.grid_size,
                         image_position=args.image_position, device=args.device, dtype=args.dtype, compile=compile,
                         **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visualrwkv chat",
        description="Ask VisualRWKV about an image. With --prompt: answer once and exit. Without: an "
                    "interactive multi-turn chat (type /help for its commands).",
        epilog=f"example:\n  {EXAMPLE}\n\n{COMMANDS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--image", default=None, help="image file to talk about (optional)")
    p.add_argument("--prompt", default=None, help="ask this once and exit")
    add_sampling_args(p)
    return p


class ChatSession:
    """The state of an interactive chat: the image and the turns so far."""

    def __init__(self, pipe, params, out=None):
        self.pipe = pipe
        self.params = params
        self.out = out or sys.stdout
        self.image = None  # (embeds, key) of the current image
        self.image_name: Optional[str] = None
        self.history: List[Tuple[str, str]] = []

    def set_image(self, path: Optional[str]) -> None:
        self.history = []
        if path is None:
            self.image, self.image_name = None, None
            return
        self.image = self.pipe.embed_image(path)  # UserError for a bad file
        self.image_name = path

    def ask(self, text: str) -> str:
        conv = self.history + [("human", text)]

        def show(delta: str) -> None:
            self.out.write(delta)
            self.out.flush()

        # cache_prompt: the next turn's prompt extends this one, so its state is kept for reuse.
        req = self.pipe.request(conv, params=self.params, on_text=show, cache_prompt=True, image_embeds=self.image)
        res = self.pipe.engine.generate([req])[0]
        self.out.write("\n")
        self.out.flush()
        if res.text:  # an empty answer would break the turn format; leave that exchange out
            self.history = conv + [("gpt", res.text)]
        return res.text


def interactive(session: ChatSession, inp=None) -> int:
    inp = inp or sys.stdin
    out = session.out
    out.write(f"VisualRWKV chat. Image: {session.image_name or 'none'}. Type /help for commands, /quit to leave.\n")
    while True:
        out.write("User: ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input (Ctrl-D)
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/help":
                out.write(COMMANDS_HELP + "\n")
            elif cmd == "/reset":
                session.history = []
                out.write("(conversation cleared)\n")
            elif cmd == "/noimage":
                session.set_image(None)
                out.write("(image dropped; new conversation)\n")
            elif cmd == "/image":
                if not arg:
                    out.write("usage: /image PATH\n")
                    continue
                try:
                    session.set_image(arg)
                    out.write(f"(image {arg} loaded; new conversation)\n")
                except UserError as e:
                    out.write(f"error: {e}\n")
            elif cmd == "/params":
                out.write(f"{session.params}\n")
            else:
                out.write(f"unknown command {cmd}; type /help\n")
            continue
        out.write("Assistant: ")
        out.flush()
        session.ask(line)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    params = sampling_from_args(args)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    if args.image is not None:
        from visualrwkv.generation.pipeline import load_image

        load_image(args.image)  # a bad image path fails now, before the model loads
    pipe = load_pipeline_from_args(args)
    session = ChatSession(pipe, params)
    session.set_image(args.image)
    if args.prompt is not None:
        session.ask(args.prompt)
        return 0
    return interactive(session)


if __name__ == "__main__":
    sys.exit(main())
