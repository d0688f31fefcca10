"""Train the bundled video micro-VLM (models/micro-qwen2vl-video) on synthetic clips and images.

    python models/train_micro_video.py            # -> models/micro-qwen2vl-video/  (~18-45 min, 1 thread, 2 shared cores)

A real ``Qwen2VLForConditionalGeneration`` with micro-qwen2vl's architecture (Qwen2-VL ViT, 8 px patches,
temporal patch 2, 2x2 PatchMerger; Qwen2 decoder with M-RoPE, whose time axis carries the temporal group): a
16-frame 64x64 clip of ``vtprune.synth.video`` is 8 temporal groups x 16 = 128 visual tokens, a 128x128 image of
``vtprune.synth`` 64. The processor is the real ``Qwen2VLProcessor`` with ``Qwen2VLImageProcessor`` (images at
128x128) and ``Qwen2VLVideoProcessor`` (frames at 64x64, every frame kept); the chat template and the word-level
tokenizer are micro-qwen2vl's, the vocabulary extended by the video questions' words.

Initialisation (``--init``): ``models/micro-qwen2vl`` by default -- the image micro-model this repository trains
from scratch with ``models/train_micro.py qwen2vl`` (its weights are copied; the rows of the embedding and
output matrices of words it did not have start at random), so the whole chain starts from random weights and
runs on CPU; ``--init scratch`` starts from random weights (it needs several times the steps).

Steps alternate: ``video_every - 1`` of every ``video_every`` steps are clip batches, the others image batches
(``train_micro``'s batches and objectives, so the image skills are kept). A clip conversation asks the clip's own
question first, then ``extra_questions`` more about the same clip (other well-posed questions of the seven
skills and training-only "What shape is the red object?" turns). Objectives, as for the image models: answer
tokens; per-token classes on the merged vision tokens (each temporal group's 16x16 px cell: background, colour x
shape, blank sign, sign with its character -- shown in either frame of the group); per-token change (the
direction the token's object moves between the group's two frames, or that it appears / disappears between
them, or "still"; changes weighted 10x): Qwen2-VL's ViT has no absolute or temporal positions, so "which way" and
"appears here" must be readable from each token, which the temporal patch makes possible (every change of
``vtprune.synth.video`` lies inside one temporal group); grounding (decoder layer 1's head-averaged attention
from each answer-predicting token on the visual tokens of the objects the question is about, in every temporal
group that shows them -- for "Which color appears/disappears first?" only on the first object's token(s) in the
group of its change; attention rows recomputed from q/k on SDPA); and a running count (decoder layer 2's hidden
state at a flashing shape's token predicts which flash of the clip it is, 1..4: a causal decoder can count the
shape's earlier tokens, and the answer token, attending to all of them, reads the mean (n + 1) / 2 for n flashes).

Seeded (weights, data order, question draws); one torch thread by default; ``--state FILE`` saves a resumable
state every ``--save-every`` steps, ``--resume FILE`` continues it. Writes ``training_log.jsonl`` (every step)
and ``eval_results.json`` (command, training time, losses, held-out accuracy per skill on the validation clips,
the shipped mp4 test split and the image test split) next to the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:  # run from a source checkout without installing
        sys.path.insert(0, path)

import train_micro as tm  # noqa: E402

from vtprune.bench.accuracy import evaluate_vqa  # noqa: E402
from vtprune.synth import SKILLS, generate_sample, load_test_split  # noqa: E402
from vtprune.synth.glyphs import CHARACTERS  # noqa: E402
from vtprune.synth.scene import COLORS, SHAPES  # noqa: E402
from vtprune.synth.video import (  # noqa: E402
    DIRECTIONS,
    FRAME_SIZE,
    NUM_FRAMES,
    VIDEO_CHANCE,
    VIDEO_SKILLS,
    clip_questions,
    generate_training_clip,
    generate_video_split,
    load_video_test_split,
    track_map,
)

COLOR_NAMES = tuple(COLORS)
_COMBOS = [(c, s) for c in COLOR_NAMES for s in SHAPES]

#: words of the video questions (and a few for everyday video prompts) added to micro-qwen2vl's vocabulary
VIDEO_WORDS = tuple(sorted(set(
    ("does appear or disappear what character flashes on the sign which way move color appears disappears first "
     "become how many times flash shape object video clip frame frames happens happen moves changes change "
     "into after before then").split()) | set(DIRECTIONS)))

# motion_weight 5 (10x the other auxiliary losses): at 0.5 the change head, sharing one clipped gradient with every
# other loss, learned the axis of a move but not its sign within 1750 steps, and motion answers stayed at chance
# (30 %); at 2 / 5 the motion skill reached 50 / 73 % on the test clips (models/README.md)
PRESET = {
    "steps": 1750, "batch_size": 8, "image_batch_size": 16, "video_every": 5, "lr": 1e-3, "warmup": 50,
    "extra_questions": 6, "image_extra_questions": 6, "dense_weight": 0.5, "motion_weight": 5.0, "ground_weight": 0.5,
    "ground_layer": 1, "count_weight": 0.5, "count_layer": 2,
    "init": "models/micro-qwen2vl",
}

# per-token classes of a clip: background, the 24 colour x shape combinations, a blank sign, a sign showing a
# character
VIDEO_DENSE_CLASSES = ["background"] + [f"{c} {s}" for c, s in _COMBOS] + ["sign"] + [f"sign {c}" for c in CHARACTERS]
TOKEN_CELL = 2 * tm.PATCH            # one merged visual token covers 16x16 px
TOKEN_SIDE = FRAME_SIZE // TOKEN_CELL  # 4 tokens per side per temporal group
GROUPS = NUM_FRAMES // 2               # temporal patch 2


# --------------------------------------------------------------------------------------------------
# Model, tokenizer, processor
# --------------------------------------------------------------------------------------------------


def build(preset: dict, seed: int):
    """(model, processor, tokenizer): micro-qwen2vl's architecture with the extended vocabulary, initialised from
    ``preset["init"]`` (a micro-qwen2vl directory) or at random ("scratch")."""
    import transformers

    tokenizer = tm.build_tokenizer("qwen2vl", VIDEO_WORDS)
    torch.manual_seed(seed)
    model, _ = tm.build_qwen2vl(tokenizer, tm.PRESETS["qwen2vl"])
    if preset["init"] != "scratch":
        source = Path(preset["init"])
        source = source if source.is_absolute() else REPO / source
        warm_start(model, tokenizer, source)
    image_pixels, frame_pixels = tm.IMAGE_SIZE * tm.IMAGE_SIZE, FRAME_SIZE * FRAME_SIZE
    common = {"patch_size": tm.PATCH, "temporal_patch_size": 2, "merge_size": 2}
    from vtprune.testing import _make_processor, _video_processor

    processor = _make_processor(
        transformers.Qwen2VLProcessor,
        image_processor=transformers.Qwen2VLImageProcessorPil(
            **common, size={"shortest_edge": image_pixels, "longest_edge": image_pixels}),
        tokenizer=tokenizer,
        video_processor=_video_processor(
            "Qwen2VLVideoProcessor", **common, size={"shortest_edge": frame_pixels, "longest_edge": frame_pixels}),
        chat_template=tokenizer.chat_template,
    )
    return model, processor, tokenizer


def warm_start(model, tokenizer, source: Path) -> None:
    """Copy the weights of the micro-qwen2vl at ``source``: every tensor of equal shape; the embedding and output
    rows by token (words the source's vocabulary lacks keep their random rows)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    if not (source / "model.safetensors").is_file():
        raise SystemExit(f"--init {source}: no model.safetensors there; train it first "
                         "(python models/train_micro.py qwen2vl) or pass --init scratch")
    # loaded through the class so the checkpoint's key layout is converted to the installed one
    weights = Qwen2VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).state_dict()
    old_vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    new_vocab = tokenizer.get_vocab()
    pairs = [(new_vocab[t], i) for t, i in old_vocab.items() if t in new_vocab]
    new_index = torch.tensor([n for n, _ in pairs])
    old_index = torch.tensor([o for _, o in pairs])
    state = model.state_dict()
    copied = 0
    missing = sorted(set(state) - set(weights))
    if missing:
        raise SystemExit(f"--init {source}: the checkpoint lacks {missing[:3]}")
    for name, tensor in weights.items():
        if state[name].shape == tensor.shape:
            state[name] = tensor
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[name] = state[name].clone()
            state[name][new_index] = tensor[old_index]
        else:
            raise SystemExit(f"--init {source}: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(state[name].shape)}")
        copied += 1
    model.load_state_dict(state)
    print(f"initialised from {source}: {copied} tensors, {len(pairs)} of {len(new_vocab)} token rows", flush=True)


# --------------------------------------------------------------------------------------------------
# Clip batches
# --------------------------------------------------------------------------------------------------


def warmup_clip_questions(tracks) -> list[tuple[str, str, tuple[int, ...]]]:
    """Training-only "What shape is the red object?" turns (objects of one colour for the whole clip)."""
    return [(f"What shape is the {t.color} object?", t.shape, (i,)) for i, t in enumerate(tracks)
            if t.kind == "shape" and len(set(t.colors)) == 1]


def clip_turns(clip, rng: np.random.Generator, count: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``count`` more (question, answer, targets) about the same clip: a skill (or the warm-up set) with a
    question is drawn uniformly, then one of its questions."""
    pool = {**clip_questions(clip.tracks), "warmup": warmup_clip_questions(clip.tracks)}
    skills = [skill for skill, questions in pool.items() if questions]
    turns: list[tuple[str, str, tuple[int, ...]]] = []
    for _ in range(count):
        questions = pool[skills[int(rng.integers(len(skills)))]]
        turn = questions[int(rng.integers(len(questions)))]
        if turn[0] != clip.question and turn not in turns:
            turns.append(turn)
    return turns


def clip_conversation(clip, turns) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": clip.question}]},
                {"role": "assistant", "content": clip.answer}]
    for question, answer, *_ in turns:
        messages += [{"role": "user", "content": [{"type": "text", "text": question}]},
                     {"role": "assistant", "content": answer}]
    return messages


def _group_owners(clip) -> np.ndarray:
    """int [GROUPS, 2, FRAME_SIZE, FRAME_SIZE]: the track drawn at each pixel of both frames of each group."""
    maps = np.stack([track_map(clip.tracks, t) for t in range(NUM_FRAMES)])  # [T, H, W]
    return maps.reshape(GROUPS, 2, FRAME_SIZE, FRAME_SIZE)


def _token_blocks(owners: np.ndarray) -> np.ndarray:
    """[GROUPS, tokens, 2 * cell * cell] pixels' owners per merged token (raster order within a group)."""
    g = owners.reshape(GROUPS, 2, TOKEN_SIDE, TOKEN_CELL, TOKEN_SIDE, TOKEN_CELL)
    return g.transpose(0, 2, 4, 1, 3, 5).reshape(GROUPS, TOKEN_SIDE * TOKEN_SIDE, -1)


#: per-token change inside a temporal group: none, a move step (4 directions), the object appears in the group's
#: second frame, or disappears from it
MOTION_CLASSES = ("still", *DIRECTIONS, "appear", "disappear")
MOTION_WEIGHTS = torch.tensor([1.0] + [10.0] * (len(MOTION_CLASSES) - 1))
MAX_COUNT = 4


def _direction(before, after) -> int:
    """MOTION_CLASSES index of the move from box ``before`` to box ``after`` (0: no move)."""
    dx, dy = after[0] - before[0], after[1] - before[1]
    if dx == dy == 0:
        return 0
    if abs(dx) >= abs(dy):
        return 1 + DIRECTIONS.index("right" if dx > 0 else "left")
    return 1 + DIRECTIONS.index("down" if dy > 0 else "up")


def clip_dense_targets(clip, owners: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """Per merged visual token (group-major, raster within a group): (class, motion class, running count).

    Class: the track covering most of the token's pixels over both frames if it covers at least 1/8 of them (a
    sign fills a quarter of the token in each frame), else background; a sign is "sign <c>" if either frame of
    the group shows its character. Motion: the direction the token's object moves between the group's two
    frames, or whether it appears / disappears between them (MOTION_CLASSES; "still" elsewhere) -- the temporal
    patch sees both frames, so each token can carry its own local change (Qwen2-VL's ViT has no absolute
    positions for the decoder to compare). Running count (for the decoder-side count objective): on a flashing
    shape's token, which flash of the clip it is (1..MAX_COUNT, in time order); -100 (ignored) elsewhere."""
    blocks = _token_blocks(owners)  # [G, 16, 512]
    labels, motion, counts = [], [], []
    flash_index = {i: {start // 2: n + 1 for n, (start, _) in enumerate(track.runs())}
                   for i, track in enumerate(clip.tracks) if track.role == "flash"}
    for g in range(GROUPS):
        coverage = np.stack([(blocks[g] == k).sum(axis=1) for k in range(len(clip.tracks))], axis=1)  # [16, K]
        best, amount = coverage.argmax(axis=1), coverage.max(axis=1)
        for token in range(blocks.shape[1]):
            if amount[token] * 8 < blocks.shape[2]:
                labels.append(0)
                motion.append(0)
                counts.append(-100)
                continue
            track = clip.tracks[best[token]]
            counts.append(min(flash_index.get(int(best[token]), {}).get(g, -100), MAX_COUNT))
            if track.kind == "sign":
                chars = [c for c in track.chars[2 * g:2 * g + 2] if c is not None]
                labels.append(1 + len(_COMBOS) + (1 + CHARACTERS.index(chars[0]) if chars else 0))
                motion.append(0)
            else:
                labels.append(1 + _COMBOS.index((track.colors[2 * g + 1], track.shape)))
                before, after = track.visible[2 * g], track.visible[2 * g + 1]
                if before != after:
                    motion.append(MOTION_CLASSES.index("appear" if after else "disappear"))
                else:
                    motion.append(_direction(track.boxes[2 * g], track.boxes[2 * g + 1]))
    return labels, motion, counts


def clip_token_mask(owners: np.ndarray, tracks: tuple[int, ...]) -> torch.Tensor:
    """bool [GROUPS * 16]: the merged tokens showing any pixel of ``tracks`` in either frame of their group."""
    blocks = _token_blocks(owners)
    wanted = np.isin(blocks, list(tracks)) if tracks else np.zeros(blocks.shape, dtype=bool)
    return torch.from_numpy(wanted.any(axis=2).reshape(-1))


def transition_group(track) -> int:
    """The temporal group in which an appearing / disappearing track changes (its change lies inside it)."""
    (start, end), = track.runs()
    return (start if track.role == "appear" else end) // 2


def ground_mask(clip, owners: np.ndarray, question: str, targets: tuple[int, ...]) -> torch.Tensor:
    """Tokens the answer-predicting token is trained to attend to: the tracks the question is about; for
    "Which color appears/disappears first, X or Y?" only the first track's tokens in the group of its change (the
    token that carries "appears/disappears here" and the colour, at the earliest temporal position)."""
    if question.startswith("Which color ") and " first, " in question:
        first = clip.tracks[targets[0]]
        mask = clip_token_mask(owners, (targets[0],)).reshape(GROUPS, -1)
        keep = torch.zeros_like(mask)
        keep[transition_group(first)] = True
        return (mask & keep).reshape(-1)
    return clip_token_mask(owners, tuple(targets))


def make_clip_batch(processor, clips, rng: np.random.Generator, extra: int):
    """Processor inputs (one conversation per clip, labels on answers) and per clip the per-turn token masks of
    the tracks each turn asks about, plus the dense targets."""
    texts, turn_masks, dense, motion, counts = [], [], [], [], []
    for clip in clips:
        turns = clip_turns(clip, rng, extra)
        texts.append(processor.apply_chat_template(clip_conversation(clip, turns), tokenize=False))
        owners = _group_owners(clip)
        asked = [(clip.question, clip.targets), *((t[0], t[2]) for t in turns)]
        turn_masks.append([(ground_mask(clip, owners, q, tuple(a)), None) for q, a in asked])
        classes, moves, running = clip_dense_targets(clip, owners)
        dense.extend(classes)
        motion.extend(moves)
        counts.extend(running)
    batch = processor(videos=[c.frames for c in clips], text=texts, return_tensors="pt", padding=True,
                      padding_side="right")
    header = processor.tokenizer.convert_tokens_to_ids(list(tm._ASSISTANT_HEADER["qwen2vl"]))
    batch["labels"] = tm.answer_labels(batch["input_ids"], batch["attention_mask"], header,
                                       processor.tokenizer.eos_token_id)
    return batch, turn_masks, torch.tensor(dense), torch.tensor(motion), torch.tensor(counts)


def make_image_batch(processor, samples, rng: np.random.Generator, extra: int):
    batch, targets = tm.make_batch(processor, "qwen2vl", samples, rng, extra)
    turn_masks = tm.turn_cell_masks(samples, targets, TOKEN_CELL)
    dense = torch.tensor([tm.dense_targets(s, TOKEN_CELL) for s in samples]).flatten()
    return batch, turn_masks, dense, None, None


def evaluate(model, processor, samples, batch_size: int = 16, progress: bool = False):
    model.eval()
    result = evaluate_vqa(model, processor, samples, batch_size=batch_size, max_new_tokens=3, progress=progress)
    model.train()
    return result


def _skills_line(result, skills) -> str:
    return " ".join(f"{k}={result.per_skill[k]:.2f}" for k in skills if k in result.per_skill)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "models" / "micro-qwen2vl-video"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--init", default=None, help="micro-qwen2vl directory to start from, or 'scratch'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-size", type=int, default=140, help="validation clips (20 per skill)")
    parser.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (0: end only)")
    parser.add_argument("--state", default=None, help="file to save the training state to (for --resume)")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", default=None, help="continue a run from a --state file (same settings)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset entry")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    preset = dict(PRESET)
    for item in args.set:
        key, value = item.split("=", 1)
        preset[key] = type(preset[key])(value) if key in preset else float(value)
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.init is not None:
        preset["init"] = args.init
    out = Path(args.out)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model, processor, tokenizer = build(preset, args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    capture = tm.VisionCapture(model.model.visual, "qwen2vl")
    width = model.config.vision_config.hidden_size
    torch.manual_seed(args.seed + 1)
    video_dense_head = nn.Linear(width, len(VIDEO_DENSE_CLASSES))
    image_dense_head = nn.Linear(width, len(tm.DENSE_CLASSES))
    motion_head = nn.Linear(width, len(MOTION_CLASSES))
    # running count of a flashing shape's tokens, read from the decoder's hidden states (1..MAX_COUNT; index 0
    # unused)
    count_head = nn.Linear(model.config.text_config.hidden_size, MAX_COUNT + 1)
    heads = {"video_dense_head": video_dense_head, "image_dense_head": image_dense_head, "motion_head": motion_head,
             "count_head": count_head}
    params = list(model.parameters()) + [p for head in heads.values() for p in head.parameters()]
    layer_capture = tm.LayerInputCapture(model.model.language_model.layers[int(preset["ground_layer"])])
    count_capture = tm.LayerInputCapture(model.model.language_model.layers[int(preset["count_layer"])])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=preset["lr"], betas=(0.9, 0.98), eps=1e-8)
    steps = int(preset["steps"])
    val_clips = generate_video_split("val", args.val_size, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "training_log.jsonl"
    first_step, elapsed_before = 0, 0.0
    ema = {"lm": None, "dense": None, "ground": None, "motion": None, "count": None}
    if args.resume:
        state = torch.load(args.resume, weights_only=False)
        same = {k: v for k, v in state["preset"].items() if k != "steps"} == {k: v for k, v in preset.items()
                                                                             if k != "steps"}
        if state["seed"] != args.seed or not same or state["step"] > int(steps * 0.8):
            raise SystemExit(f"{args.resume} was saved by a run with other settings (only --steps may differ, "
                             "and the state must lie before the learning-rate decay)")
        model.load_state_dict(state["model"])
        for name, head in heads.items():
            head.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        first_step, elapsed_before, ema = state["step"], state["elapsed_s"], state["ema"]
        kept = log_path.read_text().splitlines()[:first_step] if log_path.is_file() else []
        log_path.write_text("".join(line + "\n" for line in kept))
        print(f"resumed from {args.resume} at step {first_step}", flush=True)
    log = log_path.open("a" if args.resume else "w")
    print(f"micro-qwen2vl-video: {n_params / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}, {steps} steps "
          f"(clips x {preset['batch_size']}, every {preset['video_every']}th images x {preset['image_batch_size']}), "
          f"lr {preset['lr']}, threads {args.threads}", flush=True)

    start = time.perf_counter() - elapsed_before
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc="train micro-qwen2vl-video",
               unit="step", dynamic_ncols=True, mininterval=5)
    video_steps = 0
    for step in bar:
        rng = np.random.default_rng([args.seed, 7, step])
        is_video = step % int(preset["video_every"]) != int(preset["video_every"]) - 1
        if is_video:
            n = int(preset["batch_size"])
            # half busy training clips (many questions each), half clips like the splits' (one event + distractors)
            clips = [generate_training_clip(step * n + i, seed=args.seed) if i % 2 == 0 else
                     generate_clip_train(step * n + i, args.seed) for i in range(n)]
            batch, turn_masks, dense_target, motion_target, count_target = make_clip_batch(
                processor, clips, rng, int(preset["extra_questions"]))
            cells = tm.image_cells(batch["input_ids"], model.config.video_token_id)
            head = video_dense_head
        else:
            n = int(preset["image_batch_size"])
            samples = [generate_sample("train", step * n + i, seed=args.seed) for i in range(n)]
            batch, turn_masks, dense_target, motion_target, count_target = make_image_batch(
                processor, samples, rng, int(preset["image_extra_questions"]))
            cells = tm.image_cells(batch["input_ids"], model.config.image_token_id)
            head = image_dense_head
        peak, warmup = preset["lr"], int(preset["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = tm.lr_at(step, steps, peak, warmup)
        output = model(**batch)
        loss = output.loss
        ground = tm.grounding_loss(layer_capture, batch["attention_mask"], batch["labels"], cells, turn_masks, 1.0)
        loss = loss + preset["ground_weight"] * ground
        dense = nn.functional.cross_entropy(head(capture.tokens.float()), dense_target)
        loss = loss + preset["dense_weight"] * dense
        motion = torch.zeros(())
        if motion_target is not None:
            # moving tokens are ~2 % of a clip's: weighted up so the head cannot settle on "still"
            motion = nn.functional.cross_entropy(motion_head(capture.tokens.float()), motion_target,
                                                 weight=MOTION_WEIGHTS)
            loss = loss + preset["motion_weight"] * motion
        count = torch.zeros(())
        if count_target is not None and (count_target >= 0).any():
            # the decoder's hidden state at a flashing shape's k-th flash token predicts k: attending to all of
            # the shape's tokens, the answer token then reads the mean running count, (n + 1) / 2 for n flashes
            visual = count_capture.hidden[cells >= 0].float()   # [B * 128, D], same order as the targets
            count = nn.functional.cross_entropy(count_head(visual), count_target, ignore_index=-100)
            loss = loss + preset["count_weight"] * count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        values = {"lm": float(output.loss), "dense": float(dense), "ground": float(ground), "motion": float(motion),
                  "count": float(count)}
        for key, value in values.items():
            ema[key] = value if ema[key] is None else 0.98 * ema[key] + 0.02 * value
        record = {"step": step + 1, "kind": "video" if is_video else "image",
                  **{f"{k}_loss": round(v, 5) for k, v in values.items()},
                  "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - start, 1)}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < steps:
            result = evaluate(model, processor, val_clips[:70])
            record["val_acc_70"] = round(result.overall, 4)
            bar.write(f"step {step + 1}: val(70) {result.overall:.3f} {_skills_line(result, VIDEO_SKILLS)}")
        log.write(json.dumps(record) + "\n")
        log.flush()
        if args.state and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            state = {"step": step + 1, "seed": args.seed, "preset": preset, "model": model.state_dict(),
                     **{name: head.state_dict() for name, head in heads.items()}, "optimizer": optimizer.state_dict(),
                     "elapsed_s": time.perf_counter() - start, "ema": ema}
            torch.save(state, f"{args.state}.tmp")
            os.replace(f"{args.state}.tmp", args.state)
        video_steps += is_video
        bar.set_postfix(lm=f"{ema['lm']:.3f}", ground=f"{ema['ground']:.3f}", dense=f"{ema['dense']:.3f}",
                        motion=f"{ema['motion']:.3f}", count=f"{ema['count']:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    capture.remove()
    layer_capture.remove()
    count_capture.remove()

    model.eval()
    generation = model.generation_config
    generation.do_sample = False
    generation.max_new_tokens = 4
    generation.bos_token_id = model.config.text_config.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id

    print("evaluating on the validation clips, the mp4 test split and the image test split ...", flush=True)
    val = evaluate(model, processor, val_clips, progress=True)
    test = evaluate(model, processor, load_video_test_split(), progress=True)
    image_test = evaluate(model, processor, load_test_split(), batch_size=32, progress=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    results = {
        "family": "qwen2vl-video", "seed": args.seed, "preset": preset, "parameters": n_params,
        "train_seconds": round(train_seconds, 1), "steps": steps,
        "final_lm_loss_ema": round(ema["lm"], 4), "final_dense_loss_ema": round(ema["dense"], 4),
        "final_ground_loss_ema": round(ema["ground"], 4), "final_motion_loss_ema": round(ema["motion"], 4),
        "final_count_loss_ema": round(ema["count"], 4),
        "chance": VIDEO_CHANCE,
        "val": val.to_dict(), "test": test.to_dict(), "image_test": image_test.to_dict(),
        "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "command": "python models/train_micro_video.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"trained in {train_seconds / 60:.1f} min; final answer loss (EMA) {ema['lm']:.4f}")
    for name, result, skills in (("val clips", val, VIDEO_SKILLS), ("test clips (mp4)", test, VIDEO_SKILLS),
                                 ("image test", image_test, SKILLS)):
        print(f"{name}: {result.overall:.3f} ± {result.stderr:.3f} (n={result.n})  {_skills_line(result, skills)}")
    print(f"saved to {out}")
    return 0


def generate_clip_train(index: int, seed: int):
    """Clip ``index`` of the "train" split (one event of a round-robin skill + distractors)."""
    from vtprune.synth.video import generate_clip

    return generate_clip("train", index, seed)


if __name__ == "__main__":
    sys.exit(main())
