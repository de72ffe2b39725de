"""``visualrwkv demo``: a Gradio web app. Upload an image, ask a question, watch the answer stream.

    visualrwkv demo --model_path M.pth --vision_tower_name openai/clip-vit-large-patch14-336 [--port 7860] [--share]

It uses the same pipeline (prompt builder, prefill with the image scan, recurrent decoding) as
chat, the server and evaluation, and the server's batch worker, so several visitors' answers are
decoded together. The API name of the answer event is ``/answer`` (for ``gradio_client``).
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from typing import Iterator, List, Optional, Tuple

from visualrwkv.errors import UserError
from visualrwkv.generation.sampling import SamplingParams

EXAMPLE_QUESTIONS = {
    "bluejay.jpg": "What kind of bird is this?",
    "extreme_ironing.jpg": "What is unusual about this image?",
    "pizza.jpg": "Describe the food in detail.",
}


def example_images() -> List[Tuple[str, str]]:
    """(path, question) for the example photos shipped in ``visualrwkv/assets/examples``."""
    folder = resources.files("visualrwkv").joinpath("assets", "examples")
    out = []
    for name, question in EXAMPLE_QUESTIONS.items():
        path = folder.joinpath(name)
        if path.is_file():
            out.append((str(path), question))
    return out


def answer_stream(worker, pipe, image, question: str, temperature: float, top_p: float, top_k: int,
                  presence_penalty: float, frequency_penalty: float, max_new_tokens: int,
                  seed: Optional[int] = None) -> Iterator[Tuple[str, str]]:
    """Yields (answer so far, status line). Raises ``UserError`` for bad input."""
    if not question or not question.strip():
        raise UserError("please type a question")
    params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k), presence_penalty=float(presence_penalty),
                            frequency_penalty=float(frequency_penalty),
                            seed=None if seed is None or int(seed) < 0 else int(seed)).validate()
    t0 = time.perf_counter()
    req = pipe.request([("human", question.strip())], image=image, params=params)
    handle = worker.submit(req)
    text, done = "", False
    try:
        for kind, val in handle.events():
            if kind == "text":
                text += val
                yield text, "generating..."
            elif kind == "done":
                done = True
                dt = time.perf_counter() - t0
                status = (f"{val.completion_tokens} tokens in {dt:.2f} s "
                          f"({val.completion_tokens / max(dt, 1e-9):.1f} tokens/s), finish: {val.finish_reason}, "
                          f"mean token probability {val.mean_prob:.3f}")
                yield val.text, status
            else:
                done = True
                raise UserError(f"generation failed: {val}")
    finally:
        if not done:  # the visitor pressed stop or left
            handle.cancel()


def build_demo(pipe, worker, title: str = "VisualRWKV"):
    """The Gradio Blocks app for a loaded pipeline and a started ``BatchWorker``."""
    import gradio as gr

    defaults = SamplingParams.chat()

    def answer(image, question, temperature, top_p, top_k, presence, frequency, max_new_tokens, seed):
        try:
            yield from answer_stream(worker, pipe, image, question, temperature, top_p, top_k, presence, frequency,
                                     max_new_tokens, seed)
        except UserError as e:
            raise gr.Error(str(e))

    device = f"{pipe.device}".upper() if pipe.device.type == "cpu" else str(pipe.device)
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nUpload an image, ask a question, and the answer streams in. "
                    f"RWKV-6 reads the image and your question in one pass, then writes one token at a time "
                    f"at constant cost.  \nImage position: `{pipe.image_position}`, "
                    f"{pipe.model.n_image_tokens} image tokens, device: `{device}`.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", height=320)
                question = gr.Textbox(label="Question", placeholder="What is in the picture?", lines=2)
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    clear = gr.Button("Clear")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                    presence = gr.Slider(0.0, 2.0, value=defaults.presence_penalty, step=0.05,
                                         label="Presence penalty")
                    frequency = gr.Slider(0.0, 2.0, value=defaults.frequency_penalty, step=0.05,
                                          label="Frequency penalty")
                    max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
            with gr.Column(scale=1):
                output = gr.Textbox(label="Answer", lines=12, interactive=False)
                status = gr.Markdown("")
        examples = example_images()
        if examples:
            gr.Examples(examples=[[p, q] for p, q in examples], inputs=[image, question], label="Examples")
        inputs = [image, question, temperature, top_p, top_k, presence, frequency, max_new_tokens, seed]
        ask.click(answer, inputs, [output, status], api_name="answer")
        question.submit(answer, inputs, [output, status], api_name=False)
        clear.click(lambda: (None, "", "", ""), None, [image, question, output, status], api_name=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    from visualrwkv.generation.chat import add_model_args

    p = argparse.ArgumentParser(
        prog="visualrwkv demo", description="Gradio web demo: image upload, question, streamed answer.",
        epilog="example:\n  visualrwkv demo --model_path VisualRWKV-v060-1B6-v1.0-20240612.pth "
               "--vision_tower_name openai/clip-vit-large-patch14-336 --port 7860",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("web")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all; default 127.0.0.1)")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    g.add_argument("--max_batch_size", type=int, default=8, help="visitors' answers decoded together (default 8)")
    g.add_argument("--title", default="VisualRWKV")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    import gradio  # noqa: F401  (fail early with the 'demo' extra hint when it is missing)

    from visualrwkv.generation.chat import load_pipeline_from_args
    from visualrwkv.serve.worker import BatchWorker

    pipe = load_pipeline_from_args(args, max_batch_size=args.max_batch_size)
    worker = BatchWorker(pipe.engine, max_batch_size=args.max_batch_size).start()
    demo = build_demo(pipe, worker, args.title)
    demo.queue(default_concurrency_limit=max(1, args.max_batch_size))
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share)
    except OSError as e:
        raise UserError(f"cannot start the web server on {args.host}:{args.port}: {e}") from None
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
