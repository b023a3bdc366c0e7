"""The demo's synthetic video task: clips of coloured shapes that move, appear, disappear and
change colour, with captions that tell what happens in order.

Everything is generated from a seed with numpy, so the demo target, its draft and the tests all
draw from one distribution without any data on disk. A clip is N_FRAMES RGB frames of
FRAME_SIZE x FRAME_SIZE on a textured background, with one or two objects:

    object   colour x shape x size, placed so that it never leaves the frame
    event    moves left/right/up/down (the whole clip), or appears / disappears / turns <colour>
             at an early or a late frame

The caption's wording depends on the prompt (PROMPTS: one phrasing each), so the target's greedy
answer is a deterministic function of (prompt, clip) that a draft can learn, while its tokens still
vary from clip to clip. Events are told in time order; events at the same time, left to right.

    clip(seed) -> Clip(frames [T, H, W, 3] uint8, scene)     caption(scene, prompt) -> str
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_SIZE = 112          # 8 x 8 patches of 14: the tiny tower's 4 x 4 merged tokens per frame pair
N_FRAMES = 8              # 4 temporal patches of 2 frames: 64 visual tokens per clip
EARLY_FRAME, LATE_FRAME = 2, 6   # when appear/disappear/turn events happen (temporal patches 1 and 3)

COLORS = {
    "red": (220, 40, 40),
    "green": (50, 190, 70),
    "blue": (60, 100, 240),
    "yellow": (240, 215, 40),
    "purple": (160, 70, 210),
    "white": (240, 240, 240),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (105, 105, 105),
    "dark green": (20, 60, 30),
    "navy": (20, 25, 75),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 13, "big": 22}        # half-width in pixels
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_DISTANCE = 40                       # pixels over the whole clip
EVENTS = (*MOVES, "appears", "disappears", "turns")

# prompt -> phrasing; the first is the demo's default question
PROMPTS = ("Describe the video.", "What happens in this clip?", "Caption this video briefly.")


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    event: str              # "left" | "right" | "up" | "down" | "appears" | "disappears" | "turns"
    time: int               # frame of the event (0 for motion)
    x: float                # centre at frame 0
    y: float
    new_color: str = ""     # for "turns"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def ordered(self) -> list[SceneObject]:
        """Objects in the order the caption tells them: by event time, then left to right."""
        return sorted(self.objects, key=lambda o: (o.time, o.x))


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray      # [N_FRAMES, FRAME_SIZE, FRAME_SIZE, 3] uint8
    scene: Scene


def random_scene(rng: np.random.Generator) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    n_objects = int(rng.integers(1, 3))
    objects: list[SceneObject] = []
    colors = list(COLORS)
    while len(objects) < n_objects:
        color = str(rng.choice(colors))
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        event = str(rng.choice(list(EVENTS)))
        time = 0 if event in MOVES else int(rng.choice([EARLY_FRAME, LATE_FRAME]))
        new_color = str(rng.choice([c for c in colors if c != color])) if event == "turns" else ""
        r = SIZES[size]
        # the centre's range keeps the whole path inside the frame
        dx, dy = MOVES.get(event, (0, 0))
        lo_x, hi_x = r + 2 + max(0, -dx) * MOVE_DISTANCE, FRAME_SIZE - r - 3 - max(0, dx) * MOVE_DISTANCE
        lo_y, hi_y = r + 2 + max(0, -dy) * MOVE_DISTANCE, FRAME_SIZE - r - 3 - max(0, dy) * MOVE_DISTANCE
        x, y = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        candidate = SceneObject(color, shape, size, event, time, x, y, new_color)
        # two objects of one description would make the caption ambiguous; overlaps hide shapes
        if any((o.color, o.shape) == (color, shape) or _paths_touch(o, candidate) for o in objects):
            continue
        objects.append(candidate)
    return Scene(background, tuple(objects))


def _centre(o: SceneObject, frame: int) -> tuple[float, float]:
    dx, dy = MOVES.get(o.event, (0, 0))
    f = frame / (N_FRAMES - 1)
    return o.x + dx * MOVE_DISTANCE * f, o.y + dy * MOVE_DISTANCE * f


def visible(o: SceneObject, frame: int) -> bool:
    """Whether o is in the frame (it appears or disappears at o.time)."""
    return not ((o.event == "appears" and frame < o.time) or (o.event == "disappears" and frame >= o.time))


def _paths_touch(a: SceneObject, b: SceneObject) -> bool:
    gap = SIZES[a.size] + SIZES[b.size] + 4
    for frame in range(N_FRAMES):
        (ax, ay), (bx, by) = _centre(a, frame), _centre(b, frame)
        if abs(ax - bx) < gap and abs(ay - by) < gap:
            return True
    return False


def _shape_mask(shape: str, cx: float, cy: float, r: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # triangle pointing up: apex at the top, base at the bottom
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scene's frames: background colour with a soft gradient and per-frame noise, then the objects."""
    yy, xx = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32)
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy) / FRAME_SIZE * rng.uniform(10, 30)
    noise = rng.standard_normal((N_FRAMES, FRAME_SIZE, FRAME_SIZE, 1), dtype=np.float32) * 5
    frames = base + gradient[None, :, :, None] + noise
    for o in scene.objects:
        r = SIZES[o.size]
        for f in range(N_FRAMES):
            if not visible(o, f):
                continue
            color = o.new_color if o.event == "turns" and f >= o.time else o.color
            cx, cy = _centre(o, f)
            # the shape's bounding box only: masks over the whole frame would dominate the cost
            x0, x1 = max(0, int(cx) - r - 1), min(FRAME_SIZE, int(cx) + r + 2)
            y0, y1 = max(0, int(cy) - r - 1), min(FRAME_SIZE, int(cy) + r + 2)
            box = frames[f, y0:y1, x0:x1]
            box[_shape_mask(o.shape, cx, cy, r, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1])] = COLORS[color]
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def clip(seed: int) -> Clip:
    """The clip of a seed: the same seed gives the same frames and scene everywhere."""
    rng = np.random.default_rng([0x5BA7, seed])
    scene = random_scene(rng)
    return Clip(render(scene, rng), scene)


# --- captions ---------------------------------------------------------------------------------

def _event_words(o: SceneObject, style: int) -> str:
    if o.event in MOVES:
        return (f"moves {o.event}", f"slides {o.event}", f"going {o.event}")[style]
    if o.event == "turns":
        return (f"turns {o.new_color}", f"changes to {o.new_color}", f"turning {o.new_color}")[style]
    if o.event == "appears":
        return ("appears", "shows up", "appearing")[style]
    return ("disappears", "vanishes", "disappearing")[style]


def caption(scene: Scene, prompt: str) -> str:
    """The caption of scene in the phrasing the prompt asks for (PROMPTS)."""
    style = PROMPTS.index(prompt)
    objs = scene.ordered()
    parts = []
    for i, o in enumerate(objs):
        name = f"{o.size} {o.color} {o.shape}" if style < 2 else f"{o.color} {o.shape}"
        same_time = i > 0 and o.time == objs[i - 1].time
        if style == 0:
            opener = "" if i == 0 else ("At the same time, " if same_time else "Then ")
            sentence = f"{opener}a {name} {_event_words(o, 0)}."
            if i == 0:
                sentence = f"On a {scene.background} background, {sentence}"
            parts.append(sentence[0].upper() + sentence[1:])
        elif style == 1:
            lead = "In this clip, a" if i == 0 else (", while a" if same_time else ", and after that a")
            parts.append(f"{lead} {name} {_event_words(o, 1)}")
        else:
            lead = "" if i == 0 else (" and " if same_time else ", then ")
            parts.append(f"{lead}{name} {_event_words(o, 2)}")
    if style == 0:
        return " ".join(parts)
    return "".join(parts) + "."


def caption_facts(scene: Scene) -> list[tuple[str, str, str]]:
    """(colour, shape, event word) of each object, in caption order: what a correct caption names."""
    return [(o.color, o.shape, o.new_color if o.event == "turns" else o.event) for o in scene.ordered()]


EVENT_WORDS = {"left": ("left",), "right": ("right",), "up": ("up",), "down": ("down",),
               "appears": ("appears", "shows", "appearing"), "disappears": ("disappears", "vanishes", "disappearing")}


def caption_is_correct(text: str, scene: Scene) -> bool:
    """True when text names every fact of the scene, in any of the phrasings: the objects' shapes in
    caption order and no other shape; right before each shape its colour, and before that its size
    when the caption gives sizes; after it, before the next object's shape, its event (for a colour
    change, the new colour is the first colour named after the shape); and the background when the
    caption names one."""
    words = text.lower().replace(",", " ").replace(".", " ").replace(";", " ").split()
    objs = scene.ordered()
    if sum(w in SHAPES for w in words) != len(objs):
        return False
    ats, pos = [], 0
    for o in objs:
        try:
            ats.append(words.index(o.shape, pos))
        except ValueError:
            return False
        pos = ats[-1] + 1
    for i, (o, at) in enumerate(zip(objs, ats)):
        if at < 1 or words[at - 1] != o.color:
            return False
        if at >= 2 and words[at - 2] in SIZES and words[at - 2] != o.size:
            return False
        clause = words[at + 1:ats[i + 1] if i + 1 < len(ats) else len(words)]
        if o.event == "turns":
            named = [w for w in clause if w in COLORS]
            if not named or named[0] != o.new_color:
                return False
        elif not any(w in clause for w in EVENT_WORDS[o.event]):
            return False
    if "background" in words:
        at = words.index("background")
        name = scene.background.split()
        if words[max(0, at - len(name)):at] != name:
            return False
    return True


def corpus_text(n_scenes: int = 2000, seed: int = 0) -> list[str]:
    """Captions of many scenes in every phrasing plus the prompts: the demo tokenizer's training text."""
    rng = np.random.default_rng([0x70C, seed])
    out = list(PROMPTS)
    for _ in range(n_scenes):
        scene = random_scene(rng)
        out.extend(caption(scene, p) for p in PROMPTS)
    return out
