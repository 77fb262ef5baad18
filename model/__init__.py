"""Coupled Mamba fusion model for multimodal sentiment analysis."""
