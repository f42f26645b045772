"""The LazyDiffusion web demo (Gradio): ``demo.ui.build_demo`` builds the Blocks, ``demo.handlers``
holds the event logic as plain functions, ``demo.models`` loads the shared pipelines and
``demo.examples`` the ShapesWorld examples. Run it with ``python app.py``."""
