"""Small modules that reproduce timm's dropout patterns line for line (timm 1.0 ``layers/drop.py``,
``layers/attention.py`` / ``models/vision_transformer.py`` and ``models/resnet.py``), for the conformance tests
where timm itself cannot be imported (it needs a torchvision built for the installed torch).

* :class:`DropPath`, :class:`DropBlock2d`: modules with a float ``drop_prob`` and their own forward;
* :class:`ResNetLike`: ``forward_head`` applies ``F.dropout(x, p=float(self.drop_rate), ...)`` to the pooled
  features (a rate held as a float), blocks hold DropBlock and DropPath;
* :class:`Attention`: with ``fused_attn`` it passes ``dropout_p=self.attn_drop.p`` to
  ``F.scaled_dot_product_attention`` and never calls ``self.attn_drop``; :class:`ViTLike` stacks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(
    x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def drop_block_fast_2d(
    x: Tensor, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0
) -> Tensor:
    _, _, h, w = x.shape
    total_size = w * h
    clipped_block_size = min(block_size, min(w, h))
    gamma = (
        gamma_scale
        * drop_prob
        * total_size
        / clipped_block_size**2
        / ((w - block_size + 1) * (h - block_size + 1))
    )
    block_mask = torch.empty_like(x).bernoulli_(gamma)
    block_mask = F.max_pool2d(
        block_mask.to(x.dtype), kernel_size=clipped_block_size, stride=1, padding=clipped_block_size // 2
    )
    block_mask = 1 - block_mask
    normalize_scale = (block_mask.numel() / block_mask.to(dtype=torch.float32).sum().add(1e-6)).to(
        dtype=x.dtype
    )
    return x * block_mask * normalize_scale


class DropBlock2d(nn.Module):
    def __init__(self, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob
        self.gamma_scale = gamma_scale
        self.block_size = block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.drop_prob:
            return x
        return drop_block_fast_2d(x, self.drop_prob, self.block_size, self.gamma_scale)


class BasicBlock(nn.Module):
    def __init__(self, channels: int, drop_block: nn.Module, drop_path: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.drop_block = drop_block
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU()
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class ResNetLike(nn.Module):
    """timm's ResNet in miniature: ``resnet18(drop_rate=..., drop_path_rate=..., drop_block_rate=...)``."""

    def __init__(
        self,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.1,
        drop_block_rate: float = 0.1,
        classes: int = 3,
    ) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.layer1 = nn.Sequential(
            BasicBlock(8, DropBlock2d(drop_block_rate, block_size=3), DropPath(drop_path_rate / 2)),
            BasicBlock(8, DropBlock2d(drop_block_rate, block_size=3), DropPath(drop_path_rate)),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer1(self.act1(self.bn1(self.conv1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 2, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True  # timm: use_fused_attn(), True on torch >= 2.0
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, attn_drop: float, proj_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViTLike(nn.Module):
    """timm's VisionTransformer in miniature (tokens in, logits out): ``attn_drop_rate``, ``proj_drop_rate``,
    ``drop_path_rate`` and the head's ``nn.Dropout(drop_rate)``."""

    def __init__(
        self,
        dim: int = 16,
        depth: int = 2,
        drop_rate: float = 0.1,
        attn_drop_rate: float = 0.1,
        proj_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
        classes: int = 3,
    ) -> None:
        super().__init__()
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.patch_embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(*[Block(dim, attn_drop_rate, proj_drop_rate, r) for r in rates])
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.blocks(self.patch_embed(x)))
        return self.head(self.head_drop(x.mean(dim=1)))
