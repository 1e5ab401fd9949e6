"""Front ends: the sample CLI (cli), terminal chat, Gradio app, lm-eval model."""
