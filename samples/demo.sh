#!/usr/bin/env bash
# The demo behind `make demo`: invert and reconstruct a photo, then a text edit and an object move in a shapes scene,
# all with the shipped toy model (offline). Outputs go to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/demo
mkdir -p "$out"
echo "== invert a photo (scikit-image 'coffee', 64x64) with DDIM and with exact BDIA" >&2
diffedit invert samples/coffee.png -o "$out/coffee.ddim.safetensors" --overwrite
diffedit invert samples/coffee.png -e bdia -o "$out/coffee.bdia.safetensors" --overwrite
echo "== reconstruct it from the record" >&2
diffedit reconstruct "$out/coffee.bdia.safetensors" -o "$out/coffee.back.png" --overwrite
echo "== edit a shapes scene: the orange star becomes yellow (edit-friendly DDPM, CFG 5)" >&2
diffedit edit samples/scene.png -e ddpm-ef -g 5 \
  -s "an orange star and a green triangle on a black background" \
  -t "a yellow star and a green triangle on a black background" \
  -o "$out/scene.yellow.png" --overwrite
echo "== move the star to the right (PixelMan, 16 steps, no inversion)" >&2
diffedit move samples/scene.png --mask samples/scene.star-mask.png --to 46,44 \
  -o "$out/scene.moved.png" --overwrite
echo "== generate" >&2
diffedit generate "a red circle on a white background" --seed 1 -o "$out/red-circle.png" --overwrite
echo "outputs in $out/:" >&2
ls "$out" >&2
