"""The VisualRWKV model (SPEC §1, §4, §5): vision tower -> grid pooling -> projector -> RWKV-6,
with the image segment scanned in both directions in odd layers.

Batches are right-padded and every row is computed as if it were alone: the model is causal, the
image of each row is spliced at that row's own placeholder, and the scan permutation is built per
row. Checkpoint layout: ``rwkv.*`` (language model), ``proj.weight`` (C, Dv), ``vit.*`` (tower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from visualrwkv.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from visualrwkv.errors import UserError
from visualrwkv.models.pooling import grid_pool, num_image_tokens
from visualrwkv.models.rwkv6 import RWKV6, RWKVState
from visualrwkv.models import vision
from visualrwkv.ops.wkv6 import prepare_packed


def release_vit_keys(sd, prefix: str = ""):
    """Tower keys in the released layout, in place: ``vit.vision_model.*``.

    The released checkpoints were written with transformers 4, whose ``CLIPVisionModel`` (and
    ``SiglipVisionModel``) keep the transformer under ``vision_model``; transformers 5 dropped that
    level (``embeddings.*`` directly). Files we write always use the released names, so the original
    code and ours read each other's files. Idempotent."""
    head, full = prefix + "vit.", prefix + "vit.vision_model."
    for k in [k for k in sd if k.startswith(head) and not k.startswith(full)]:
        sd[full + k[len(head):]] = sd.pop(k)
    return sd


class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds ``factor * max_logit`` to each row's largest logit
    (the original's regulariser that keeps logits small). logits: (M, V)."""

    @staticmethod
    def forward(ctx, loss, logits, factor):
        ctx.save_for_backward(logits)
        ctx.factor = factor
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (logits,) = ctx.saved_tensors
        maxx, ids = logits.max(dim=-1, keepdim=True)
        g = torch.zeros_like(logits).scatter_(-1, ids, maxx * ctx.factor)
        return grad_output, g, None


def _vit_keys_to_release(module, state_dict, prefix, local_metadata):
    release_vit_keys(state_dict, prefix)


def _vit_keys_from_release(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):
    full = prefix + "vit.vision_model."
    for k in [k for k in state_dict if k.startswith(full)]:
        state_dict[prefix + "vit." + k[len(full):]] = state_dict.pop(k)


@dataclass
class MultimodalInputs:
    """A batch after splicing. embeds (B, T, C); valid (B, T) bool; labels (B, T) or None;
    scan_perm (B, T) long or None (no image in the batch); image_start/n_image per row (-1 / 0 if none)."""

    embeds: torch.Tensor
    valid: torch.Tensor
    labels: Optional[torch.Tensor]
    scan_perm: Optional[torch.Tensor]
    image_start: torch.Tensor
    lengths: torch.Tensor
    n_real: int = -1  # sum(lengths), known on the host (-1: not computed)
    lengths_host: Optional[list] = None  # lengths as host ints (read back with the other numbers)
    n_supervised: int = -1  # positions with a next-token target (labels given), known on the host


@dataclass
class VisualOutput:
    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    state: Optional[RWKVState]
    n_tokens: int = 0  # supervised tokens in the batch


class VisualRWKV(nn.Module):
    def __init__(self, rwkv: RWKV6, vit: Optional[nn.Module], vision_hidden: int, grid_size: int = -1,
                 num_patches: int = 576, freeze_vit: bool = True):
        super().__init__()
        self.rwkv = rwkv
        self.vit = vit
        self.proj = nn.Linear(vision_hidden, rwkv.cfg.n_embd, bias=False)
        self.grid_size = grid_size
        self.num_patches = num_patches
        self.n_image_tokens = num_image_tokens(grid_size, num_patches)
        self.freeze_vit = freeze_vit
        self.l2wrap = True
        if vit is not None and not hasattr(vit, "vision_model"):
            # transformers >= 5: rename to and from the released ``vit.vision_model.*`` layout.
            self.register_state_dict_post_hook(_vit_keys_to_release)
            self.register_load_state_dict_pre_hook(_vit_keys_from_release)
        if vit is not None and freeze_vit:
            vit.requires_grad_(False)
            vit.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vit is not None and self.freeze_vit:
            self.vit.eval()  # a frozen tower always runs in eval mode
        return self

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path_or_sd, vision_tower_name: str, grid_size: int = -1,
                        dtype: Optional[torch.dtype] = torch.float32, device="cpu") -> "VisualRWKV":
        """A released-format file (``rwkv.*``, ``proj.weight``, ``vit.*``) + the tower folder for its
        config and processor. Strict: every key must be there with the right shape."""
        from visualrwkv.checkpoint import (check_state_dict, config_from_state_dict, load_state_dict_file,
                                           strip_prefix)

        source = path_or_sd if isinstance(path_or_sd, str) else "state dict"
        sd = load_state_dict_file(path_or_sd) if isinstance(path_or_sd, str) else dict(path_or_sd)
        if "proj.weight" not in sd or not any(k.startswith("rwkv.") for k in sd):
            raise UserError(f"{source} is not a VisualRWKV checkpoint (no proj.weight / rwkv.* keys); "
                            "to start stage 1 from an RWKV model use --load_model")
        release_vit_keys(sd)  # files written by transformers-5 code without the hook still load
        rwkv_sd = strip_prefix(sd, "rwkv.")
        cfg = config_from_state_dict(rwkv_sd, source)
        vcfg = vision.vision_config(vision_tower_name)
        vit_sd = {k: v for k, v in strip_prefix(sd, "vit.vision_model.").items() if not k.endswith("position_ids")}
        with torch.device("meta"):
            rwkv = RWKV6(cfg)
        vit = vision.build_vision_model(vcfg) if vit_sd else vision.load_vision_model(vision_tower_name)
        model = cls(rwkv, vit, vcfg.hidden_size, grid_size, vision.num_patches(vcfg))
        expected = {k: v for k, v in model.state_dict().items()
                    if not k.endswith("position_ids") and (vit_sd or not k.startswith("vit."))}
        given = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        check_state_dict(expected, given, source)
        # Own, aligned memory for every weight (not views into the memory-mapped file): training
        # writes them, and on the CPU compute on the file's mapping measured several times slower.
        given = {k: (v.to(dtype, copy=True) if (dtype is not None and v.is_floating_point()) else v.clone())
                 for k, v in given.items()}
        model.load_state_dict(given, strict=False, assign=True)  # key sets were checked just above
        return model.to(device=device, dtype=dtype)

    @classmethod
    def from_rwkv(cls, rwkv_path_or_model, vision_tower_name: str, grid_size: int = -1,
                  dtype: Optional[torch.dtype] = torch.float32, seed: int = 0) -> "VisualRWKV":
        """Stage-1 start: an RWKV-6 ``.pth`` (or model) + a pretrained tower, with a fresh projector."""
        from visualrwkv.checkpoint import load_rwkv6

        rwkv = rwkv_path_or_model if isinstance(rwkv_path_or_model, RWKV6) else load_rwkv6(rwkv_path_or_model, dtype)
        vit = vision.load_vision_model(vision_tower_name)
        vcfg = vit.config
        torch.manual_seed(seed)
        model = cls(rwkv, vit, vcfg.hidden_size, grid_size, vision.num_patches(vcfg))
        return model.to(dtype=dtype) if dtype is not None else model

    # ---------------------------------------------------------------------------- vision side
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> projected image tokens (n, n_image_tokens, C), patches first, CLS last."""
        if self.vit is None:
            raise RuntimeError("this model has no vision tower")
        if self.freeze_vit:
            with torch.no_grad():
                feats = vision.image_features(self.vit, pixel_values)
        else:
            feats = vision.image_features(self.vit, pixel_values)
        pooled = grid_pool(feats, self.grid_size)
        return self.proj(pooled.to(self.proj.weight.dtype))

    # ---------------------------------------------------------------------------- splicing
    def _splice_layout(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor],
                       has_image: Optional[torch.Tensor], labels: Optional[torch.Tensor], count: bool = True):
        """Placeholder positions and spliced lengths, and (count=True; else None) the numbers the host
        needs as one (6 + B,) long tensor on input_ids' device: [most placeholders in a row, has_image
        mismatches, rows with an image, longest spliced row, total spliced tokens, supervised targets,
        spliced length per row]."""
        B, T = input_ids.shape
        device = input_ids.device
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=device)
        is_ph = input_ids == IMAGE_TOKEN_INDEX
        n_ph = is_ph.sum(1)
        row_has = n_ph > 0
        n = self.n_image_tokens
        pos = torch.where(row_has, is_ph.float().argmax(1), torch.full_like(n_ph, -1))  # (B,)
        extra = torch.where(row_has, torch.full_like(n_ph, n - 1), torch.zeros_like(n_ph))
        new_len = lengths + extra
        if not count:
            return n_ph, row_has, pos, new_len, None
        zero = n_ph.new_zeros(())
        mismatch = zero if has_image is None else (row_has != has_image.bool().to(device)).sum()
        n_sup = zero
        if labels is not None:
            # Targets after splicing: the labels of real, non-placeholder positions (the image adds only
            # ignored ones), less the row's first position, which no position predicts. (B, T) bool.
            sup = (labels != IGNORE_INDEX) & ~is_ph & (torch.arange(T, device=device) < lengths.unsqueeze(1))
            n_sup = sup.sum() - (sup[:, 0].sum() if T else zero)
        numbers = torch.cat([torch.stack([v.long() for v in (n_ph.max() if B else zero, mismatch, row_has.sum(),
                                                              new_len.max() if B else zero, new_len.sum(), n_sup)]),
                             new_len.long()])
        return n_ph, row_has, pos, new_len, numbers

    def splice_numbers(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                       has_image: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> List[int]:
        """The host numbers of ``build_inputs`` for this batch, computed from the tensors given. Called
        on the CPU batch before it moves to the GPU (the Lightning module does), they spare the step
        its one device-to-host read-back: pass them as ``forward(..., splice_numbers=...)`` with the same
        input_ids, lengths, labels and has_image (None where forward gets None)."""
        return self._splice_layout(input_ids, lengths, has_image, labels)[4].tolist()

    def build_inputs(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                     image_embeds: Optional[torch.Tensor] = None, has_image: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None, numbers: Optional[List[int]] = None) -> MultimodalInputs:
        """Splice image tokens at each row's -200 placeholder.

        input_ids: (B, T) right-padded, -200 at most once per row; lengths: (B,) real lengths;
        image_embeds: (n_img, n, C) for the rows with an image, in row order; labels: (B, T);
        numbers: ``splice_numbers`` of the same tensors, computed beforehand on the host (else read
        back here: every number the host needs in one transfer, which waits for the GPU's queue)."""
        B, T = input_ids.shape
        device = input_ids.device
        n = self.n_image_tokens
        if numbers is not None and len(numbers) != 6 + B:
            raise ValueError(f"splice numbers for {len(numbers) - 6} rows given with a batch of {B} rows")
        n_ph, row_has, pos, new_len, on_device = self._splice_layout(input_ids, lengths, has_image, labels,
                                                                     count=numbers is None)
        stats = list(numbers) if numbers is not None else on_device.tolist()
        most_ph, n_mismatch, n_img_rows, Tn, n_real, n_supervised = (int(v) for v in stats[:6])
        if most_ph > 1:
            rows = (n_ph > 1).nonzero().flatten().tolist()
            raise UserError(f"batch rows {rows} have more than one <image>; VisualRWKV takes one image per sample")
        if n_mismatch:
            raise ValueError("has_image does not match the <image> placeholders in input_ids")
        if n_img_rows and (image_embeds is None or image_embeds.shape[0] != n_img_rows):
            got = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(f"{n_img_rows} rows have an <image> placeholder but {got} images were given")
        text = self.rwkv.embed(input_ids.clamp(min=0))  # (B, T, C); placeholder rows get id 0 here
        C = text.shape[-1]
        j = torch.arange(Tn, device=device).unsqueeze(0).expand(B, Tn)  # output positions
        p = pos.unsqueeze(1)
        in_img = row_has.unsqueeze(1) & (j >= p) & (j < p + n)
        after = row_has.unsqueeze(1) & (j >= p + n)
        src_text = torch.where(after, j - (n - 1), j).clamp(max=T - 1)  # text index for text positions
        valid = j < new_len.unsqueeze(1)
        # Source rows: [text (T) | image tokens (n)]; image rows take index T + (j - p). Row b's
        # image is image_embeds[slot[b]] (its rank among the image rows): a gather, whose gradient
        # is an index_add, where a boolean-mask assignment would read the mask back to the host.
        if n_img_rows:
            slot = (row_has.long().cumsum(0) - 1).clamp(min=0)  # (B,)
            img_full = torch.where(row_has[:, None, None], image_embeds.to(text.dtype).index_select(0, slot), 0.0)
        else:
            img_full = text.new_zeros(B, n, C)
        src = torch.cat([text, img_full], dim=1)
        idx = torch.where(in_img, T + (j - p), src_text)
        embeds = src.gather(1, idx.unsqueeze(-1).expand(B, Tn, C))
        new_labels = None
        if labels is not None:
            lab_src = torch.cat([labels, labels.new_full((B, n), IGNORE_INDEX)], dim=1)
            new_labels = lab_src.gather(1, idx).masked_fill(~valid, IGNORE_INDEX)
        scan_perm = None
        if n_img_rows and n > 1:
            # Reverse [p, p + n - 1): the image tokens without the trailing CLS (SPEC §4).
            seg = row_has.unsqueeze(1) & (j >= p) & (j < p + n - 1)
            scan_perm = torch.where(seg, 2 * p + n - 2 - j, j)
        return MultimodalInputs(embeds, valid, new_labels, scan_perm, pos, new_len, n_real, stats[6:],
                                n_supervised if labels is not None else -1)

    # ---------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None,
                has_image: Optional[torch.Tensor] = None, image_embeds: Optional[torch.Tensor] = None,
                backend: str = "auto", return_logits: bool = False, pack: bool = False,
                splice_numbers: Optional[List[int]] = None, **_ignored) -> VisualOutput:
        """Training / scoring forward. With labels: loss = mean over rows of the mean next-token
        cross entropy over the row's supervised tokens (SPEC §5); the head runs only where needed.

        pack=True concatenates the rows' real tokens into one row and runs the WKV kernel with
        sequence offsets (cu_seqlens), so no compute is spent on padding; the result is the same.
        splice_numbers: ``splice_numbers(input_ids, lengths, has_image, labels)`` computed on the host
        beforehand (same tensors); without them the splicing reads its numbers back from the device."""
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values)
        mm = self.build_inputs(input_ids, lengths, image_embeds, has_image, labels, splice_numbers)
        B, Tn, _ = mm.embeds.shape
        if pack:
            lens = mm.lengths
            ends = torch.cumsum(lens, 0)
            offsets = ends - lens  # (B,) start of each row in the packed row
            cu = torch.cat([lens.new_zeros(1), ends])
            prepare_packed(cu, mm.lengths_host, backend)  # the WKV kernel's chunk tables from host numbers
            # Packed token i is (row rows_all[i], position i - offsets[row]): integer indices built
            # without reading anything back (the count is known), where boolean masks would sync
            # here and again in backward.
            rows_all = torch.repeat_interleave(torch.arange(B, device=lens.device), lens, output_size=mm.n_real)
            flat = rows_all * Tn + torch.arange(mm.n_real, device=lens.device) - offsets[rows_all]  # (N,)
            perm = None
            if mm.scan_perm is not None:
                perm = (mm.scan_perm + offsets[:, None]).flatten().index_select(0, flat).unsqueeze(0)
            x = mm.embeds.flatten(0, 1).index_select(0, flat).unsqueeze(0)  # (1, N, C)
            hidden, _ = self.rwkv.forward_hidden(x, scan_perm=perm, backend=backend, need_state=False, cu_seqlens=cu)
            hidden = hidden[0]  # (N, C) real tokens only
        else:
            # No padding mask needed: the model is causal, so right padding cannot reach real positions.
            hidden, _ = self.rwkv.forward_hidden(mm.embeds, scan_perm=mm.scan_perm, backend=backend,
                                                 need_state=False)
        logits = None
        if return_logits:
            if pack:
                logits = hidden.new_zeros(B, Tn, self.rwkv.cfg.vocab_size)
                logits[mm.valid] = self.rwkv.head(hidden)
            else:
                logits = self.rwkv.head(hidden)
        if labels is None:
            return VisualOutput(None, logits, None)
        # Position t predicts token t + 1; the last position of every row predicts nothing.
        target = torch.cat([mm.labels[:, 1:], mm.labels.new_full((B, 1), IGNORE_INDEX)], dim=1)  # (B, Tn)
        if pack:
            target = target.flatten().index_select(0, flat)  # (N,)
            # (M,) supervised positions in order. M is known on the host, so no read-back: a stable
            # descending sort of the 0/1 mask puts them first, in order, where nonzero would sync.
            sel = torch.sort((target != IGNORE_INDEX).to(torch.uint8), descending=True,
                             stable=True).indices[:mm.n_supervised]
            rows = rows_all.index_select(0, sel)
            h = hidden.index_select(0, sel)
            lg = self.rwkv.head(h) if logits is None else logits.flatten(0, 1).index_select(0, flat.index_select(0, sel))
        else:
            sel = target != IGNORE_INDEX  # (B, Tn)
            rows = sel.nonzero()[:, 0]
            h = hidden[sel]  # (M, C): only the supervised positions reach the head
            lg = self.rwkv.head(h) if logits is None else logits[sel]
        ce = F.cross_entropy(lg.float(), target[sel], reduction="none")  # (M,); sel: mask or indices
        per_row = torch.zeros(B, device=ce.device, dtype=ce.dtype).index_add(0, rows, ce)
        count = torch.zeros(B, device=ce.device, dtype=ce.dtype).index_add(0, rows, torch.ones_like(ce))
        loss = (per_row / count.clamp(min=1)).mean()
        if self.l2wrap and self.training and lg.requires_grad:
            loss = L2Wrap.apply(loss, lg, 1e-4 / (B * Tn))
        return VisualOutput(loss, logits, None, int(ce.numel()))

    @torch.no_grad()
    def prefill(self, input_ids: Sequence[Sequence[int]], pixel_values: Optional[torch.Tensor] = None,
                image_embeds: Optional[torch.Tensor] = None, state: Optional[RWKVState] = None,
                backend: str = "auto", runner=None) -> Tuple[torch.Tensor, RWKVState]:
        """Run prompts (lists of ids, -200 for the image) in one parallel pass, with the scan.
        Rows may differ in length and in whether they hold an image (``pixel_values`` / ``image_embeds``
        for the rows with an image, in order). Returns (last-token logits (B, V) float32, state).

        runner: optional ``(embeds, state, valid, scan_perm) -> (logits, state)`` that runs the
        spliced prompt instead of a plain forward (the engine's CUDA-graph prefill); needs a state."""
        device = self.proj.weight.device
        if min(len(x) for x in input_ids) == 0:
            raise ValueError("empty prompt")
        # Padded ids built on the host and copied once (one transfer, not one per row).
        T = max(len(x) for x in input_ids)
        ids = torch.tensor([list(x) + [0] * (T - len(x)) for x in input_ids], dtype=torch.long).to(device)
        lengths = torch.tensor([len(x) for x in input_ids]).to(device)
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values.to(device))
        mm = self.build_inputs(ids, lengths, image_embeds)
        valid = None if bool(mm.valid.all()) else mm.valid
        if runner is not None and state is not None:
            return runner(mm.embeds, state, valid, mm.scan_perm)
        logits, new_state = self.rwkv(inputs_embeds=mm.embeds, state=state, valid=valid, scan_perm=mm.scan_perm,
                                      backend=backend, last_only=True)
        return logits.float(), new_state

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, state: RWKVState, backend: str = "auto") -> Tuple[torch.Tensor, RWKVState]:
        """One decoding step for a batch: token_ids (B,) -> (logits (B, V) float32, new state)."""
        logits, state = self.rwkv(token_ids.view(-1, 1), state=state, backend=backend, last_only=True)
        return logits.float(), state
