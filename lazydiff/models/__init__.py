"""The two stages of LazyDiffusion, and the full-canvas baseline backbone."""
from .context_encoder import ContextEncoder, ContextEncoderOutput
from .full_canvas_decoder import FullCanvasDecoder, FullCanvasDecoderOutput
from .lazy_decoder import LazyDecoder, LazyDecoderOutput
from .pixart_init import full_canvas_decoder_from_pixart, lazy_decoder_from_pixart

__all__ = ["ContextEncoder", "ContextEncoderOutput", "LazyDecoder", "LazyDecoderOutput", "FullCanvasDecoder",
           "FullCanvasDecoderOutput", "lazy_decoder_from_pixart", "full_canvas_decoder_from_pixart"]
