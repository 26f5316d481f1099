"""The page's own CSS: what makes every step usable on a phone (390 px wide) as on a desktop.

- all five tabs stay in the tab bar (tighter tab padding and page margins on a narrow screen), so none hides
  behind Gradio's overflow menu;
- tables (Gradio's and those written in Markdown) keep readable columns and scroll sideways instead of
  breaking words letter by letter;
- the thumbs and other icon buttons are at least TOUCH_PX square.
"""

from __future__ import annotations

TOUCH_PX = 40                 # smallest touch target (WCAG's 44 px, less the icon buttons' own margin)
PHONE_MAX_PX = 600            # the narrow-screen rules apply up to this width
TABLE_MIN_PX = 640            # a table narrower than this scrolls sideways on a phone instead of squeezing
PROSE_LAST_COLUMN_EM = 16     # a Markdown table's last column (a sentence) keeps this width instead of towering
PROSE_TABLES = ("#train-summary", "#adapter-card")   # tables written in Markdown (the gate's checks, a card)
TABLES = ("#review-queue", "#curation-report", "#monitor-versions", "#adapters-table", "#job-metrics", *PROSE_TABLES)
WIDE_TABLES = ("#review-queue", "#monitor-versions", "#adapters-table")   # too many columns for a phone

_tables = ", ".join(f"{t} table" for t in WIDE_TABLES)
_cells = ", ".join(f"{t} th, {t} th *, {t} td, {t} td *" for t in TABLES)
_heads = ", ".join(f"{t} th, {t} th *" for t in TABLES)

CSS = f"""
#chatbot button[aria-label='Like'], #chatbot button[aria-label='Dislike'],
#chatbot button[aria-label='Liked'], #chatbot button[aria-label='Disliked'],
#chatbot .message-buttons button, #chatbot button.action {{
  min-width: {TOUCH_PX}px; min-height: {TOUCH_PX}px;
}}
{_cells} {{ word-break: normal !important; overflow-wrap: normal !important; hyphens: none; }}
{_heads} {{ white-space: nowrap !important; }}
{", ".join(f"{t} table" for t in PROSE_TABLES)} {{ display: block; max-width: 100%; overflow-x: auto; }}
{", ".join(f"{t} td:last-child" for t in PROSE_TABLES)} {{ min-width: {PROSE_LAST_COLUMN_EM}em; }}
@media (max-width: {PHONE_MAX_PX}px) {{
  .gradio-container {{ padding-left: 8px !important; padding-right: 8px !important; }}
  .gradio-container > main, .gradio-container .main {{ padding-left: 0 !important; padding-right: 0 !important; }}
  .tab-wrapper button[role='tab'], .tab-wrapper .tab-container button {{
    padding-left: 7px !important; padding-right: 7px !important; font-size: 15px !important;
  }}
  {", ".join(TABLES)} {{ overflow-x: auto !important; }}
  {", ".join(f"{t} .table-wrap" for t in TABLES)} {{ overflow-x: auto !important; }}
  {_tables} {{ min-width: {TABLE_MIN_PX}px !important; }}
  button {{ min-height: {TOUCH_PX}px; }}
}}
"""
