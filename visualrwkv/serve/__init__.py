"""Serving: the Gradio demo (``visualrwkv demo``), the OpenAI-compatible HTTP server
(``visualrwkv serve``) and the batch worker they share."""
