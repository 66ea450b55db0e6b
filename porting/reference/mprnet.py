"""Torch reference of MPRNet whose state_dict is key for key the official releases'.

Written from the project's spec (shared/specs/restormer_mprnet.md, section 2), not copied from
the original. The three released task folders differ only in the default widths, which live in
the flax configs (``flaxrestore.models.mprnet``); this class takes them as keywords.
The official files store the weights under ``'state_dict'`` (possibly with a ``module.`` prefix,
which ``porting.checkpoint`` strips).
"""

from __future__ import annotations

import torch
from torch import nn

RELEASE_KEY = "state_dict"


def conv(in_channels, out_channels, kernel_size, bias=False, stride=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, bias=bias)


class CALayer(nn.Module):
    def __init__(self, channel, reduction=16, bias=False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=bias),
            nn.ReLU(),
            nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=bias),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return x * self.conv_du(self.avg_pool(x))


class CAB(nn.Module):
    def __init__(self, n_feat, kernel_size, reduction, bias, act):
        super().__init__()
        self.CA = CALayer(n_feat, reduction, bias=bias)
        self.body = nn.Sequential(conv(n_feat, n_feat, kernel_size, bias=bias), act,
                                  conv(n_feat, n_feat, kernel_size, bias=bias))

    def forward(self, x):
        return self.CA(self.body(x)) + x


class SAM(nn.Module):
    def __init__(self, n_feat, kernel_size, bias):
        super().__init__()
        self.conv1 = conv(n_feat, n_feat, kernel_size, bias=bias)
        self.conv2 = conv(n_feat, 3, kernel_size, bias=bias)
        self.conv3 = conv(3, n_feat, kernel_size, bias=bias)

    def forward(self, x, x_img):
        x1 = self.conv1(x)
        img = self.conv2(x) + x_img
        x2 = torch.sigmoid(self.conv3(img))
        return x1 * x2 + x, img


class DownSample(nn.Module):
    def __init__(self, in_channels, s_factor):
        super().__init__()
        self.down = nn.Sequential(
            nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, in_channels + s_factor, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.down(x)


class UpSample(nn.Module):
    def __init__(self, in_channels, s_factor):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels + s_factor, in_channels, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.up(x)


class SkipUpSample(nn.Module):
    def __init__(self, in_channels, s_factor):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels + s_factor, in_channels, 1, stride=1, padding=0, bias=False))

    def forward(self, x, y):
        return self.up(x) + y


def _cabs(n, width, kernel_size, reduction, bias, act):
    return nn.Sequential(*[CAB(width, kernel_size, reduction, bias, act) for _ in range(n)])


class Encoder(nn.Module):
    def __init__(self, n_feat, kernel_size, reduction, act, bias, scale_unetfeats, csff):
        super().__init__()
        w1, w2, w3 = n_feat, n_feat + scale_unetfeats, n_feat + 2 * scale_unetfeats
        self.encoder_level1 = _cabs(2, w1, kernel_size, reduction, bias, act)
        self.encoder_level2 = _cabs(2, w2, kernel_size, reduction, bias, act)
        self.encoder_level3 = _cabs(2, w3, kernel_size, reduction, bias, act)
        self.down12 = DownSample(w1, scale_unetfeats)
        self.down23 = DownSample(w2, scale_unetfeats)
        if csff:
            self.csff_enc1 = nn.Conv2d(w1, w1, 1, bias=bias)
            self.csff_enc2 = nn.Conv2d(w2, w2, 1, bias=bias)
            self.csff_enc3 = nn.Conv2d(w3, w3, 1, bias=bias)
            self.csff_dec1 = nn.Conv2d(w1, w1, 1, bias=bias)
            self.csff_dec2 = nn.Conv2d(w2, w2, 1, bias=bias)
            self.csff_dec3 = nn.Conv2d(w3, w3, 1, bias=bias)

    def forward(self, x, encoder_outs=None, decoder_outs=None):
        fuse = encoder_outs is not None and decoder_outs is not None
        enc1 = self.encoder_level1(x)
        if fuse:
            enc1 = enc1 + self.csff_enc1(encoder_outs[0]) + self.csff_dec1(decoder_outs[0])
        enc2 = self.encoder_level2(self.down12(enc1))
        if fuse:
            enc2 = enc2 + self.csff_enc2(encoder_outs[1]) + self.csff_dec2(decoder_outs[1])
        enc3 = self.encoder_level3(self.down23(enc2))
        if fuse:
            enc3 = enc3 + self.csff_enc3(encoder_outs[2]) + self.csff_dec3(decoder_outs[2])
        return [enc1, enc2, enc3]


class Decoder(nn.Module):
    def __init__(self, n_feat, kernel_size, reduction, act, bias, scale_unetfeats):
        super().__init__()
        w1, w2, w3 = n_feat, n_feat + scale_unetfeats, n_feat + 2 * scale_unetfeats
        self.decoder_level1 = _cabs(2, w1, kernel_size, reduction, bias, act)
        self.decoder_level2 = _cabs(2, w2, kernel_size, reduction, bias, act)
        self.decoder_level3 = _cabs(2, w3, kernel_size, reduction, bias, act)
        self.skip_attn1 = CAB(w1, kernel_size, reduction, bias, act)
        self.skip_attn2 = CAB(w2, kernel_size, reduction, bias, act)
        self.up21 = SkipUpSample(w1, scale_unetfeats)
        self.up32 = SkipUpSample(w2, scale_unetfeats)

    def forward(self, outs):
        enc1, enc2, enc3 = outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class ORB(nn.Module):
    def __init__(self, n_feat, kernel_size, reduction, act, bias, num_cab):
        super().__init__()
        blocks = [CAB(n_feat, kernel_size, reduction, bias, act) for _ in range(num_cab)]
        blocks.append(conv(n_feat, n_feat, kernel_size))  # `bias` is not passed: never a bias
        self.body = nn.Sequential(*blocks)

    def forward(self, x):
        return self.body(x) + x


class ORSNet(nn.Module):
    def __init__(self, n_feat, scale_orsnetfeats, kernel_size, reduction, act, bias,
                 scale_unetfeats, num_cab):
        super().__init__()
        w = n_feat + scale_orsnetfeats
        s = scale_unetfeats
        self.orb1 = ORB(w, kernel_size, reduction, act, bias, num_cab)
        self.orb2 = ORB(w, kernel_size, reduction, act, bias, num_cab)
        self.orb3 = ORB(w, kernel_size, reduction, act, bias, num_cab)
        self.up_enc1 = UpSample(n_feat, s)
        self.up_dec1 = UpSample(n_feat, s)
        self.up_enc2 = nn.Sequential(UpSample(n_feat + s, s), UpSample(n_feat, s))
        self.up_dec2 = nn.Sequential(UpSample(n_feat + s, s), UpSample(n_feat, s))
        self.conv_enc1 = nn.Conv2d(n_feat, w, 1, bias=bias)
        self.conv_enc2 = nn.Conv2d(n_feat, w, 1, bias=bias)
        self.conv_enc3 = nn.Conv2d(n_feat, w, 1, bias=bias)
        self.conv_dec1 = nn.Conv2d(n_feat, w, 1, bias=bias)
        self.conv_dec2 = nn.Conv2d(n_feat, w, 1, bias=bias)
        self.conv_dec3 = nn.Conv2d(n_feat, w, 1, bias=bias)

    def forward(self, x, encoder_outs, decoder_outs):
        x = self.orb1(x)
        x = x + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
        x = self.orb2(x)
        x = x + self.conv_enc2(self.up_enc1(encoder_outs[1])) + \
            self.conv_dec2(self.up_dec1(decoder_outs[1]))
        x = self.orb3(x)
        x = x + self.conv_enc3(self.up_enc2(encoder_outs[2])) + \
            self.conv_dec3(self.up_dec2(decoder_outs[2]))
        return x


class MPRNet(nn.Module):
    def __init__(self, in_c=3, out_c=3, n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32,
                 num_cab=8, kernel_size=3, reduction=4, bias=False):
        super().__init__()
        k, r, b = kernel_size, reduction, bias
        act = nn.PReLU()  # one slope shared by every CAB; not an attribute of MPRNet
        self.shallow_feat1 = nn.Sequential(conv(in_c, n_feat, k, bias=b), CAB(n_feat, k, r, b, act))
        self.shallow_feat2 = nn.Sequential(conv(in_c, n_feat, k, bias=b), CAB(n_feat, k, r, b, act))
        self.shallow_feat3 = nn.Sequential(conv(in_c, n_feat, k, bias=b), CAB(n_feat, k, r, b, act))
        self.stage1_encoder = Encoder(n_feat, k, r, act, b, scale_unetfeats, csff=False)
        self.stage1_decoder = Decoder(n_feat, k, r, act, b, scale_unetfeats)
        self.stage2_encoder = Encoder(n_feat, k, r, act, b, scale_unetfeats, csff=True)
        self.stage2_decoder = Decoder(n_feat, k, r, act, b, scale_unetfeats)
        self.stage3_orsnet = ORSNet(n_feat, scale_orsnetfeats, k, r, act, b, scale_unetfeats,
                                    num_cab)
        self.sam12 = SAM(n_feat, kernel_size=1, bias=b)
        self.sam23 = SAM(n_feat, kernel_size=1, bias=b)
        self.concat12 = conv(n_feat * 2, n_feat, k, bias=b)
        self.concat23 = conv(n_feat * 2, n_feat + scale_orsnetfeats, k, bias=b)
        self.tail = conv(n_feat + scale_orsnetfeats, out_c, k, bias=b)

    def forward(self, x3_img):
        H, W = x3_img.shape[2], x3_img.shape[3]
        h, w = int(H / 2), int(W / 2)
        top_img, bot_img = x3_img[:, :, :h, :], x3_img[:, :, h:, :]
        quads = [top_img[..., :w], top_img[..., w:], bot_img[..., :w], bot_img[..., w:]]

        # stage 1: each quadrant encoded on its own, halves decoded
        lt, rt, lb, rb = (self.stage1_encoder(self.shallow_feat1(q)) for q in quads)
        feat1_top = [torch.cat([a, c], 3) for a, c in zip(lt, rt)]
        feat1_bot = [torch.cat([a, c], 3) for a, c in zip(lb, rb)]
        res1_top = self.stage1_decoder(feat1_top)
        res1_bot = self.stage1_decoder(feat1_bot)
        sam_top, img1_top = self.sam12(res1_top[0], top_img)
        sam_bot, img1_bot = self.sam12(res1_bot[0], bot_img)
        stage1_img = torch.cat([img1_top, img1_bot], 2)

        # stage 2: halves encoded with cross-stage fusion, whole image decoded
        x2_top = self.concat12(torch.cat([self.shallow_feat2(top_img), sam_top], 1))
        x2_bot = self.concat12(torch.cat([self.shallow_feat2(bot_img), sam_bot], 1))
        feat2_top = self.stage2_encoder(x2_top, feat1_top, res1_top)
        feat2_bot = self.stage2_encoder(x2_bot, feat1_bot, res1_bot)
        feat2 = [torch.cat([a, c], 2) for a, c in zip(feat2_top, feat2_bot)]
        res2 = self.stage2_decoder(feat2)
        sam3, stage2_img = self.sam23(res2[0], x3_img)

        # stage 3: original resolution
        x3 = self.concat23(torch.cat([self.shallow_feat3(x3_img), sam3], 1))
        x3 = self.stage3_orsnet(x3, feat2, res2)
        return [self.tail(x3) + x3_img, stage2_img, stage1_img]
