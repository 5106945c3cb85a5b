"""FlowDCN and SiT models, the flow-matching objective, samplers, guidance and S_max policies."""
from .flowdcn import FlowDCN, FlowDCNConfig
from .registry import FLOWDCN_CONFIGS, MODELS, SIT_CONFIGS, build_model, model_config
from .sit import SiT, SiTConfig

__all__ = ["FlowDCN", "FlowDCNConfig", "SiT", "SiTConfig", "build_model", "model_config", "MODELS",
           "FLOWDCN_CONFIGS", "SIT_CONFIGS"]
