#!/usr/bin/env node
// Writes examples/cat.png, the sample image the README's commands use: a cartoon cat drawn as SVG and rendered by
// sharp, 192×160 px (30,720 pixels: inside emu3-tiny's VQ bounds of 128²–256² pixels; a full Emu3 VQ resizes it).
//   node examples/make-cat.mjs
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';

const width = 192;
const height = 160;
const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">
  <rect width="${width}" height="${height}" fill="#bfe3f5"/>
  <rect y="122" width="${width}" height="38" fill="#7cbf6a"/>
  <circle cx="160" cy="30" r="16" fill="#ffd84a"/>
  <ellipse cx="96" cy="118" rx="44" ry="30" fill="#f0a040"/>
  <path d="M136 120 Q172 112 164 78" stroke="#f0a040" stroke-width="10" fill="none" stroke-linecap="round"/>
  <circle cx="96" cy="74" r="34" fill="#f0a040"/>
  <polygon points="66,56 70,24 90,46" fill="#f0a040"/>
  <polygon points="126,56 122,24 102,46" fill="#f0a040"/>
  <polygon points="71,50 73,33 85,46" fill="#f7c8d0"/>
  <polygon points="121,50 119,33 107,46" fill="#f7c8d0"/>
  <ellipse cx="83" cy="70" rx="6" ry="8" fill="#1d3b2a"/>
  <ellipse cx="109" cy="70" rx="6" ry="8" fill="#1d3b2a"/>
  <polygon points="92,82 100,82 96,88" fill="#e0607a"/>
  <path d="M96 88 Q90 95 84 91 M96 88 Q102 95 108 91" stroke="#5a3310" stroke-width="2" fill="none"/>
  <path d="M60 80 L80 84 M60 90 L80 88 M132 80 L112 84 M132 90 L112 88" stroke="#5a3310" stroke-width="1.5"/>
</svg>`;

const out = join(dirname(fileURLToPath(import.meta.url)), 'cat.png');
const info = await sharp(Buffer.from(svg)).png({ compressionLevel: 9, palette: true }).toFile(out);
console.log(`wrote ${out} (${info.width}x${info.height}, ${info.size} bytes)`);
