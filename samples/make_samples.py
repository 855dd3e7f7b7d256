"""Build the sample manifests and reference images in this directory, deterministically.

    .venv/bin/python samples/make_samples.py

Writes prompts.csv, prompts.parquet (the same rows; reference_images is a `|`-separated string in the CSV
and a list<string> column in the Parquet file) and refs/*.png|jpg (small images drawn with Pillow).
Running it twice gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
COLUMNS = ["id", "prompt", "aspect_ratio", "variants", "reference_images", "category", "sku"]

# (id, prompt, aspect_ratio, variants, reference_images, category, sku); "" / None = the job default.
ROWS: list[tuple[str, str, str, int | None, list[str], str, str]] = [
    ("p001", "A white ceramic coffee mug on a light oak table, soft morning window light, product photo, shallow depth of field", "", None, [], "kitchen", "MUG-001"),
    ("p002", "A red running shoe floating on a pale grey background, studio lighting, crisp shadows, e-commerce catalog style", "", None, [], "footwear", "SHOE-RED-42"),
    ("p003", "Flat lay of a leather wallet, keys and sunglasses on white marble, top-down view, minimalist", "4:3", None, [], "accessories", "WAL-BRN-01"),
    ("p004", "A stainless steel water bottle beside a mountain trail at sunrise, lifestyle marketing shot", "16:9", 2, [], "outdoor", "BOT-750-SS"),
    ("p005", "A stack of three folded cotton t-shirts in navy, olive and sand, on a clean white background", "", None, [], "apparel", "TEE-PACK-3"),
    ("p006", "Close-up of a mechanical keyboard with warm backlight on a dark desk, cinematic, 35mm", "3:2", None, [], "electronics", "KB-MECH-87"),
    ("p007", "A scented soy candle in an amber glass jar, dried eucalyptus beside it, cozy living room, bokeh", "4:5", None, [], "home", "CND-EUC-200"),
    ("p008", "A white ceramic coffee mug on a light oak table, soft morning window light, product photo, shallow depth of field", "", None, [], "kitchen", "MUG-001"),
    ("p009", "Wireless earbuds in an open charging case on a reflective black surface, dramatic rim light", "1:1", 3, [], "electronics", "EAR-TWS-02"),
    ("p010", "A ceramic plant pot with a small monstera, Scandinavian interior, bright diffuse daylight", "", None, [], "home", "POT-MON-S"),
    ("p011", "The same red running shoe from the reference image, worn by a runner on a wet city street at dusk, motion blur", "16:9", None, ["refs/sneaker.png"], "footwear", "SHOE-RED-42"),
    ("p012", "A bottle of olive oil with a sprig of rosemary on a rustic wooden board, Mediterranean kitchen", "2:3", None, [], "kitchen", "OIL-EVO-500"),
    ("p013", "A child's wooden toy train in primary colours on a playroom rug, soft natural light", "", None, [], "toys", "TOY-TRN-05"),
    ("p014", "Banner for a summer sale: beach towel, sunglasses and a straw hat on sand, empty space on the right for text", "21:9", None, [], "marketing", ""),
    ("p015", "A smartwatch showing a fitness dashboard, strapped to a wrist, gym background out of focus", "", 2, [], "electronics", "WATCH-FIT-2"),
    ("p016", "A white ceramic coffee mug on a light oak table, soft morning window light, product photo, shallow depth of field", "", None, [], "kitchen", "MUG-001"),
    ("p017", "A backpack in the colour of the swatch, standing on a rocky outcrop with a valley behind, adventure catalog", "4:5", None, ["refs/swatch_teal.jpg"], "outdoor", "BAG-TRK-30"),
    ("p018", "Top-down photo of a breakfast bowl with granola, berries and yoghurt, bright and airy food styling", "1:1", None, [], "food", "GRN-BRY-400"),
    ("p019", "A pair of noise-cancelling headphones hanging on a desk lamp, home office, late afternoon light", "", None, [], "electronics", "HP-NC-700"),
    ("p020", "Synthetic training image: a single ripe banana on a plain white background, centred, no shadow", "", 3, [], "training", ""),
    ("p021", "Synthetic training image: a single green apple on a plain white background, centred, no shadow", "", 3, [], "training", ""),
    ("p022", "Synthetic training image: a single orange on a plain white background, centred, no shadow", "", None, [], "training", ""),
    ("p023", "A vertical story ad: a glass of iced coffee with condensation, café table, text space at the top", "9:16", None, [], "marketing", ""),
    ("p024", "A linen duvet set in sage green on a made bed, hotel-style bedroom, soft side light", "3:2", None, [], "home", "DUV-SAG-KG"),
    ("p025", "A red running shoe floating on a pale grey background, studio lighting, crisp shadows, e-commerce catalog style", "", None, [], "footwear", "SHOE-RED-42"),
    ("p026", "An electric toothbrush on a bathroom shelf next to a small succulent, clean white tiles", "", None, [], "personal care", "TB-SONIC-1"),
    ("p027", "A cast-iron skillet with a seared steak and herbs, steam rising, dark moody food photography", "4:3", None, [], "kitchen", "SKL-CI-26"),
    ("p028", "The shoe from the first reference image in the colour of the second, on a concrete plinth, gallery lighting", "1:1", None, ["refs/sneaker.png", "refs/swatch_teal.jpg"], "footwear", "SHOE-TEAL-42"),
    ("p029", "A hardcover notebook and a fountain pen on a walnut desk, \"Monday plans\" written on the open page", "", None, [], "stationery", "NB-A5-DOT"),
    ("p030", "Isometric 3D illustration of a cardboard shipping box with a product inside, pastel colours, white background", "", None, [], "marketing", ""),
    ("p031", "A yoga mat rolled out on a wooden deck by the sea at sunrise, one person stretching, calm mood", "16:9", None, [], "sports", "MAT-YG-6"),
    ("p032", "Synthetic training image: a single ripe banana on a plain white background, centred, no shadow", "", 3, [], "training", ""),
    ("p033", "A bicycle helmet in matte black, three-quarter view, on a seamless white sweep, catalog photo", "", None, [], "sports", "HLM-CYC-M"),
    ("p034", "Winter campaign: a wool scarf and knitted beanie on a snowy bench, soft falling snow, warm tones", "2:3", 2, [], "apparel", "SCF-WL-01"),
]


def draw_sneaker() -> bytes:
    """A simple red shoe silhouette on a light grey background (PNG)."""
    image = Image.new("RGB", (256, 160), (236, 236, 236))
    draw = ImageDraw.Draw(image)
    draw.polygon([(30, 120), (40, 70), (90, 60), (130, 85), (200, 95), (228, 112), (228, 128), (30, 128)], fill=(200, 30, 40))
    draw.rectangle([(28, 128), (230, 138)], fill=(250, 250, 250), outline=(120, 120, 120))
    for x in range(70, 130, 14):
        draw.line([(x, 70), (x + 10, 86)], fill=(255, 255, 255), width=3)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def draw_swatch(rgb: tuple[int, int, int]) -> bytes:
    """A colour swatch with a thin border (JPEG)."""
    image = Image.new("RGB", (128, 128), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([(8, 8), (119, 119)], fill=rgb, outline=(40, 40, 40), width=2)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def main() -> None:
    refs = HERE / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "sneaker.png").write_bytes(draw_sneaker())
    (refs / "swatch_teal.jpg").write_bytes(draw_swatch((0, 128, 128)))

    with open(HERE / "prompts.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for id_, prompt, aspect, variants, references, category, sku in ROWS:
            writer.writerow([id_, prompt, aspect, "" if variants is None else variants, "|".join(references), category, sku])

    table = pa.table(
        {
            "id": pa.array([r[0] for r in ROWS], pa.string()),
            "prompt": pa.array([r[1] for r in ROWS], pa.string()),
            "aspect_ratio": pa.array([r[2] or None for r in ROWS], pa.string()),
            "variants": pa.array([r[3] for r in ROWS], pa.int32()),
            "reference_images": pa.array([r[4] or None for r in ROWS], pa.list_(pa.string())),
            "category": pa.array([r[5] for r in ROWS], pa.string()),
            "sku": pa.array([r[6] for r in ROWS], pa.string()),
        }
    )
    pq.write_table(table, HERE / "prompts.parquet", compression="zstd")


if __name__ == "__main__":
    main()
