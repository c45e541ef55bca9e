"""Static files of the web chat (``modern_llm.serve``): index.html, chat.js, style.css (package data)."""
