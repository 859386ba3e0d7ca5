"""Thermal receipts and a printed invoice, drawn with PIL from their ground truth."""

from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal

from PIL import Image, ImageDraw, ImageFilter

from .drawing import add_noise, font, on_table

CENT = Decimal("0.01")


def receipt_truth(store: str, when: str, time: str, items: list[tuple[str, int, str]], tax_rate: str) -> dict:
    """Ground truth of a receipt: money as exact decimal strings, tax rounded half up to the cent."""
    lines = []
    for name, quantity, unit_price in items:
        price = (Decimal(unit_price) * quantity).quantize(CENT)
        lines.append({"name": name, "quantity": quantity, "unit_price": unit_price, "price": str(price)})
    subtotal = sum(Decimal(line["price"]) for line in lines)
    tax = (subtotal * Decimal(tax_rate) / 100).quantize(CENT, ROUND_HALF_UP)
    return {"store": store, "date": when, "time": time, "items": lines,
            "subtotal": str(subtotal), "tax": str(tax), "total": str(subtotal + tax), "tax_rate": tax_rate}


def receipt(truth: dict, *, address: str, phone: str, card: str, angle: float, seed: int) -> Image.Image:
    """A thermal receipt: store header, date and time, items with quantity and price, totals, monospace."""
    mono, bold = font("DejaVuSansMono", 17), font("DejaVuSansMono-Bold", 17)
    big = font("DejaVuSansMono-Bold", 24)
    width_chars, char_w, line_h = 34, 10.25, 23
    lines: list[tuple[str, object, str]] = [  # (text, font, alignment)
        (truth["store"].upper(), big, "center"), (address, mono, "center"), (f"Tel {phone}", mono, "center"),
        ("-" * width_chars, mono, "left"),
    ]
    day = date.fromisoformat(truth["date"])
    lines.append((f"{day:%m/%d/%Y}".ljust(width_chars - 10) + f"  {truth['time']}".rjust(10), mono, "left"))
    lines.append(("-" * width_chars, mono, "left"))
    for item in truth["items"]:
        if item["quantity"] == 1:
            lines.append((item["name"].ljust(width_chars - 9) + item["price"].rjust(9), mono, "left"))
        else:
            lines.append((item["name"], mono, "left"))
            detail = f"  {item['quantity']} @ {item['unit_price']}"
            lines.append((detail.ljust(width_chars - 9) + item["price"].rjust(9), mono, "left"))
    lines.append(("-" * width_chars, mono, "left"))
    for label, value, face in (("SUBTOTAL", truth["subtotal"], mono), (f"TAX {truth['tax_rate']}%", truth["tax"], mono),
                               ("TOTAL", truth["total"], bold)):
        lines.append((label.ljust(width_chars - 10) + value.rjust(10), face, "left"))
    lines += [(f"{card}".ljust(width_chars - 10) + truth["total"].rjust(10), mono, "left"),
              ("-" * width_chars, mono, "left"), ("THANK YOU - PLEASE COME AGAIN", mono, "center")]

    paper_w = int(width_chars * char_w) + 40
    paper = Image.new("RGB", (paper_w, 40 + line_h * (len(lines) + 1)), (250, 249, 244))
    draw = ImageDraw.Draw(paper)
    y = 22
    for text, face, alignment in lines:
        x = paper_w / 2 if alignment == "center" else 20
        draw.text((x, y), text, font=face, fill=(38, 38, 44), anchor="ma" if alignment == "center" else "la")
        y += line_h + (6 if face is big else 0)
    return add_noise(on_table(paper, angle, margin=40), seed, strength=5, blur=0.5)


def invoice(truth: dict) -> Image.Image:
    """A one-page invoice with invoice and due dates, a line-item table and the total due."""
    page = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(page)
    regular, bold = font("DejaVuSans", 18), font("DejaVuSans-Bold", 18)
    draw.rectangle([0, 0, 850, 120], fill=(32, 64, 110))
    draw.text((50, 35), truth["seller"], font=font("DejaVuSans-Bold", 34), fill="white")
    draw.text((52, 80), "14 Harbour Road, Portsmouth  ·  accounts@example.com", font=regular, fill=(220, 228, 240))
    draw.text((50, 160), "INVOICE", font=font("DejaVuSans-Bold", 44), fill=(32, 64, 110))
    invoice_day, due_day = date.fromisoformat(truth["invoice_date"]), date.fromisoformat(truth["due_date"])
    facts = [("Invoice number", truth["number"]), ("Invoice date", f"{invoice_day:%B} {invoice_day.day}, {invoice_day.year}"),
             ("Due date", f"{due_day:%B} {due_day.day}, {due_day.year}")]
    for row, (label, value) in enumerate(facts):
        draw.text((480, 170 + row * 32), f"{label}:", font=bold, fill=(40, 40, 40))
        draw.text((655, 170 + row * 32), value, font=regular, fill=(40, 40, 40))
    draw.text((50, 250), "Bill to:", font=bold, fill=(40, 40, 40))
    for row, text in enumerate(truth["bill_to"]):
        draw.text((50, 280 + row * 26), text, font=regular, fill=(40, 40, 40))
    top = 400
    draw.rectangle([50, top, 800, top + 40], fill=(230, 236, 245))
    for x, header in ((60, "Description"), (470, "Qty"), (560, "Unit price"), (700, "Amount")):
        draw.text((x, top + 10), header, font=bold, fill=(32, 64, 110))
    y = top + 55
    for item in truth["items"]:
        draw.text((60, y), item["name"], font=regular, fill=(40, 40, 40))
        draw.text((480, y), str(item["quantity"]), font=regular, fill=(40, 40, 40))
        draw.text((560, y), f"${item['unit_price']}", font=regular, fill=(40, 40, 40))
        draw.text((790, y), f"${item['price']}", font=regular, fill=(40, 40, 40), anchor="ra")
        draw.line([(50, y + 34), (800, y + 34)], fill=(220, 220, 220), width=1)
        y += 46
    for label, value, face in (("Subtotal", truth["subtotal"], regular), (f"Tax ({truth['tax_rate']}%)", truth["tax"], regular),
                               ("Total due", truth["total"], font("DejaVuSans-Bold", 22))):
        y += 10
        draw.text((660, y), label, font=face, fill=(40, 40, 40), anchor="ra")
        draw.text((790, y), f"${value}", font=face, fill=(40, 40, 40), anchor="ra")
        y += 30
    draw.text((50, 1000), f"Payment terms: net {truth['terms_days']} days. Thank you for your business.",
              font=regular, fill=(90, 90, 90))
    return page.filter(ImageFilter.GaussianBlur(0.3))  # a clean scan
