"""Gradio UI (placeholder; the full UI replaces this)."""
import gradio as gr


def build_ui(service):
    with gr.Blocks(title="domain-assistant") as demo:
        gr.Markdown("# domain-assistant")
    return demo
