"""Clock faces, digital watches and calculators, drawn with PIL."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .drawing import add_noise, canvas, finish, font, polar

# Which of the segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle) are lit for each digit.
SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg", "5": "acdfg", "6": "acdefg",
    "7": "abc", "8": "abcdefg", "9": "abcdfg", "-": "g", " ": "",
}


def _segment_polygon(name: str, x: float, y: float, w: float, h: float, t: float) -> list[tuple[float, float]]:
    """A hexagonal segment of a digit whose box starts at (x, y), w wide, h tall, t thick."""
    half = t / 2
    horizontal = {"a": y + half, "g": y + h / 2, "d": y + h - half}
    vertical = {"f": (x + half, y, y + h / 2), "b": (x + w - half, y, y + h / 2),
                "e": (x + half, y + h / 2, y + h), "c": (x + w - half, y + h / 2, y + h)}
    gap = t * 0.25
    if name in horizontal:
        cy = horizontal[name]
        x0, x1 = x + half + gap, x + w - half - gap
        return [(x0, cy), (x0 + half, cy - half), (x1 - half, cy - half), (x1, cy), (x1 - half, cy + half), (x0 + half, cy + half)]
    cx, y0, y1 = vertical[name]
    y0, y1 = y0 + half + gap, y1 - half - gap
    return [(cx, y0), (cx + half, y0 + half), (cx + half, y1 - half), (cx, y1), (cx - half, y1 - half), (cx - half, y0 + half)]


def draw_seven_segment(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, height: float,
                       on=(20, 24, 20), off=None) -> float:
    """Draw digits (and ':' or '.') as LCD segments; unlit segments in `off` if given. Returns the end x."""
    width, thickness, spacing = height * 0.5, height * 0.11, height * 0.18
    for char in text:
        if char in ":.":
            r = thickness * 0.6
            dots = [y + height * 0.3, y + height * 0.7] if char == ":" else [y + height - r]
            for cy in dots:
                draw.ellipse([x + r, cy - r, x + 3 * r, cy + r], fill=on)
            x += 4 * r + spacing * 0.5
            continue
        for name in "abcdefg":
            lit = name in SEGMENTS[char]
            if lit or off is not None:
                draw.polygon(_segment_polygon(name, x, y, width, height, thickness), fill=on if lit else off)
        x += width + spacing
    return x


def analog_clock(hour: int, minute: int, *, numerals: bool = True, size: int = 512, seed: int = 0,
                 dial=(250, 247, 238), case=(46, 48, 54)) -> Image.Image:
    """A watch face at hour:minute; the hour hand advances with the minutes, as on a real clock."""
    image, draw = canvas(size, size, (214, 208, 198))
    s = size * 2
    cx = cy = s / 2
    draw.ellipse([cx - 0.47 * s, cy - 0.47 * s, cx + 0.47 * s, cy + 0.47 * s], fill=case)
    draw.ellipse([cx - 0.425 * s, cy - 0.425 * s, cx + 0.425 * s, cy + 0.425 * s], fill=dial)
    for tick in range(60):
        major = tick % 5 == 0
        inner = 0.35 * s if major else 0.385 * s
        draw.line([polar(cx, cy, inner, tick * 6), polar(cx, cy, 0.41 * s, tick * 6)],
                  fill=(25, 25, 25), width=int(s * (0.012 if major else 0.004)))
    if numerals:
        numeral_font = font("DejaVuSans-Bold", int(0.075 * s))
        for number in range(1, 13):
            px, py = polar(cx, cy, 0.29 * s, number * 30)
            draw.text((px, py), str(number), font=numeral_font, fill=(25, 25, 25), anchor="mm")
    draw.text((cx, cy - 0.14 * s), "QUARTZ", font=font("DejaVuSans", int(0.032 * s)), fill=(90, 90, 90), anchor="mm")
    hour_angle = (hour % 12 + minute / 60) * 30
    minute_angle = minute * 6
    _hand(draw, cx, cy, hour_angle, length=0.22 * s, width=0.03 * s, color=(18, 18, 22))
    _hand(draw, cx, cy, minute_angle, length=0.36 * s, width=0.018 * s, color=(18, 18, 22))
    draw.ellipse([cx - 0.022 * s, cy - 0.022 * s, cx + 0.022 * s, cy + 0.022 * s], fill=(150, 30, 30))
    return add_noise(finish(image), seed, strength=3, blur=0.3)


def _hand(draw, cx, cy, angle, length, width, color):
    """A tapered hand from slightly behind the centre to `length` along `angle`."""
    tail = polar(cx, cy, -0.12 * length, angle)
    tip = polar(cx, cy, length, angle)
    left = polar(*tail, width / 2, angle - 90)
    right = polar(*tail, width / 2, angle + 90)
    mid_left = polar(*polar(cx, cy, 0.75 * length, angle), width / 3, angle - 90)
    mid_right = polar(*polar(cx, cy, 0.75 * length, angle), width / 3, angle + 90)
    draw.polygon([left, mid_left, tip, mid_right, right], fill=color)


def hand_angles(hour: int, minute: int) -> tuple[float, float]:
    """(hour hand, minute hand) angles in degrees clockwise from 12."""
    return (hour % 12 + minute / 60) * 30, minute * 6.0


def digital_watch(hour: int, minute: int, *, weekday: str = "TUE", day: int = 14, twelve_hour: bool = True,
                  seed: int = 0, strap=(40, 40, 44)) -> Image.Image:
    """A digital wristwatch with a segment LCD; 12-hour watches show PM."""
    width, height = 560, 420
    image, draw = canvas(width, height, (222, 218, 210))
    s = 2
    draw.rectangle([190 * s, 0, 370 * s, height * s], fill=strap)
    draw.rounded_rectangle([80 * s, 70 * s, 480 * s, 350 * s], radius=60 * s, fill=(70, 72, 78))
    draw.rounded_rectangle([110 * s, 110 * s, 450 * s, 310 * s], radius=24 * s, fill=(176, 190, 168))
    label = font("DejaVuSans-Bold", 20 * s)
    draw.text((130 * s, 122 * s), f"{weekday} {day}", font=label, fill=(30, 34, 30))
    shown = (hour % 12 or 12) if twelve_hour else hour
    if twelve_hour:
        draw.text((400 * s, 122 * s), "PM" if hour >= 12 else "AM", font=label, fill=(30, 34, 30))
    digits = f"{shown:>2d}:{minute:02d}"
    draw_seven_segment(draw, digits, 150 * s, 168 * s, 96 * s, on=(22, 26, 22), off=(166, 180, 158))
    draw.text((280 * s, 90 * s), "DIGITAL", font=font("DejaVuSans", 13 * s), fill=(200, 200, 200), anchor="mm")
    return add_noise(finish(image), seed, strength=3, blur=0.4)


KEYPAD = [["C", "±", "%", "÷"], ["7", "8", "9", "×"], ["4", "5", "6", "−"], ["1", "2", "3", "+"], ["0", "00", ".", "="]]


def key_above(label: str) -> str:
    """The key directly above `label` on KEYPAD."""
    for row, keys in enumerate(KEYPAD):
        if label in keys and row > 0:
            return KEYPAD[row - 1][keys.index(label)]
    raise ValueError(f"no key above {label!r}")


def calculator(expression: str, result: str, *, body=(52, 54, 60), seed: int = 0) -> Image.Image:
    """A pocket calculator showing `expression` on the upper line and `result` in segment digits."""
    width, height = 420, 660
    image, draw = canvas(width, height, (200, 196, 188))
    s = 2
    draw.rounded_rectangle([20 * s, 20 * s, 400 * s, 640 * s], radius=36 * s, fill=body)
    draw.rectangle([250 * s, 44 * s, 370 * s, 74 * s], fill=(60, 40, 40))  # solar cell
    for x in range(254, 370, 29):
        draw.line([(x * s, 44 * s), (x * s, 74 * s)], fill=(90, 70, 70), width=s)
    draw.text((50 * s, 50 * s), "CALC-12", font=font("DejaVuSans-Bold", 18 * s), fill=(210, 210, 210))
    draw.rounded_rectangle([45 * s, 90 * s, 375 * s, 210 * s], radius=10 * s, fill=(186, 198, 170))
    draw.text((360 * s, 104 * s), expression, font=font("DejaVuSansMono", 24 * s), fill=(30, 36, 30), anchor="ra")
    digit_height = 60 * s
    digits_width = sum(digit_height * (0.2 if c in ".:" else 0.68) for c in result)
    draw_seven_segment(draw, result, 360 * s - digits_width, 138 * s, digit_height, on=(22, 26, 22))
    key_font = font("DejaVuSans-Bold", 28 * s)
    for row, keys in enumerate(KEYPAD):
        for col, key in enumerate(keys):
            x0, y0 = (45 + col * 84) * s, (240 + row * 78) * s
            color = (225, 120, 40) if key in "÷×−+=" else (90, 92, 100) if key in ("C", "±", "%") else (235, 235, 232)
            text_color = (255, 255, 255) if key not in [k for k in "0123456789."] + ["00"] else (30, 30, 30)
            draw.rounded_rectangle([x0, y0, x0 + 72 * s, y0 + 62 * s], radius=12 * s, fill=color)
            draw.text((x0 + 36 * s, y0 + 31 * s), key, font=key_font, fill=text_color, anchor="mm")
    return add_noise(finish(image), seed, strength=3, blur=0.4)
