"""The Space's logic, importable and testable apart from the Gradio page: families, classification, figures, views."""
