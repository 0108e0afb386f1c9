#!/usr/bin/env bash
# Every table measured on the shipped toy model's pixels, one command each, into
# benchmarks/results/PREFIX-* (default prefix v4, the shipped model's version: the folders
# docs/benchmarks.md and the model READMEs quote). Run it after anything that changes what the toy
# model draws or decodes (a new decoder, a new UNet), alone on the CPU: about 145 minutes on 2 cores
# (103 on 2026-12-05, the held-out rows added since about 22, the dilated word masks about 8, ddim-p2p
# with Direct Inversion's attention settings about 8). Then `diffedit bench docs` regenerates the
# tables of docs/benchmarks.md; the numbers quoted in prose (samples/*/README.md, docs/) are updated
# by hand. `--list` prints the commands without running them; `--skip REGEX` leaves out those it
# matches (e.g. after a new UNet only: --skip 'toy-flow|bench vae|-m samples/toy-lcm ', the tables of
# models and parts that did not change); `--only REGEX` runs only those it matches (e.g. --only
# 'heldout').
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=v4
list=0
skip=
only=
usage="usage: toy-tables.sh [--list] [--skip REGEX] [--only REGEX] [PREFIX]"
while [ $# -gt 0 ]; do
    case "$1" in
        --list) list=1 ;;
        --skip)
            [ $# -ge 2 ] || { echo "toy-tables.sh: --skip needs a regular expression ($usage)" >&2; exit 2; }
            skip=$2
            shift ;;
        --only)
            [ $# -ge 2 ] || { echo "toy-tables.sh: --only needs a regular expression ($usage)" >&2; exit 2; }
            only=$2
            shift ;;
        -*) echo "toy-tables.sh: unknown option $1 ($usage)" >&2; exit 2 ;;
        *) prefix=$1 ;;
    esac
    shift
done
out=benchmarks/results/$prefix
lcm_lora=samples/toy-lcm-lora/pytorch_lora_weights.safetensors
held_out=samples/shapesbench-heldout.jsonl
text_kinds=recolour,reshape
# The solvers' and the flow model's folders are named without a model version (the flow model has
# its own history); another prefix puts them beside the others.
unversioned=benchmarks/results/
[ "$prefix" = v4 ] || unversioned=$out-
flow_engines="-e rf-inversion -e rf-solver -e fireflow -e flowedit"

commands=(
    # Prompt following and the VAE / DDIM round trips (toy-sd README, "Quality").
    "json_to $out-quality/results.json toy quality -g 7.5"
    # Layout-in-attention diagnostic, at the papers' edit CFG, the folder's (diffedit.json) and without guidance.
    "json_to $out-layout/results.json toy layout"
    "json_to $out-layout/results-g5.json toy layout -g 5"
    "json_to $out-layout/results-g1.json toy layout -g 1"
    # ... with the target's text the source's but at the swapped word's token (what the next token's change does).
    "json_to $out-layout/results-g1-word-only.json toy layout -g 1 --word-only"
    "json_to $out-layout/results-word-only.json toy layout --word-only"
    # ... and on the held-out recolour tasks, at the papers' edit CFG and the folder's.
    "json_to $out-heldout-layout/results.json toy layout --tasks $held_out"
    "json_to $out-heldout-layout/results-g5.json toy layout --tasks $held_out -g 5"
    # The VAE's round trip, from the encoder's latent and refined by decoder inversion.
    "diffedit bench vae --save $out-vae"
    # Every text-edit engine on all 40 recolour and 40 reshape tasks, no feature injection.
    "diffedit bench shapes -e direct --kinds $text_kinds --save $out-shapes40-direct"
    "diffedit bench shapes -e direct --kinds $text_kinds -g 7.5 --param cross_replace=0.4 --param cross_replace_edited=0.4 --param self_replace=0.6 --save $out-shapes40-direct-papers"
    "diffedit bench shapes -e direct --kinds $text_kinds --decoder-inversion 50 --save $out-shapes40-direct-decinv50"
    "diffedit bench shapes -e ddim-p2p --kinds $text_kinds --save $out-shapes40-ddim-p2p"
    "diffedit bench shapes -e ddim --kinds $text_kinds --save $out-shapes40-ddim"
    # ... and both DDIM engines at the folder's edit CFG for Direct Inversion (5): the papers' order at equal guidance.
    "diffedit bench shapes -e ddim-p2p --kinds $text_kinds -g 5 --save $out-shapes40-ddim-p2p-g5"
    "diffedit bench shapes -e ddim --kinds $text_kinds -g 5 --save $out-shapes40-ddim-g5"
    # ... and ddim-p2p with the folder's attention settings for Direct Inversion (at its papers' CFG 7.5).
    "diffedit bench shapes -e ddim-p2p --kinds $text_kinds --param self_replace=1.0 --param cross_replace=0.8 --param cross_replace_edited=0.6 --save $out-shapes40-ddim-p2p-direct-settings"
    "diffedit bench shapes -e infedit --kinds $text_kinds --save $out-shapes40-infedit"
    "diffedit bench shapes -e bdia --kinds $text_kinds --save $out-shapes40-bdia"
    "diffedit bench shapes -e ddpm-ef --kinds $text_kinds --save $out-shapes40-ddpm-ef"
    # InfEdit on the toy LCM (which carries its own copy of this VAE).
    "diffedit bench shapes -e infedit -m samples/toy-lcm --kinds $text_kinds,reconstruct --save $out-shapes40-lcm-infedit"
    "diffedit bench shapes -e infedit -m samples/toy-lcm --kinds $text_kinds --param inject_features=0.4 --save $out-shapes40-lcm-infedit-pnp"
    # Moves: the folder's energy scale and the paper's.
    "diffedit bench shapes -e pixelman --kinds move --save $out-shapes-move"
    "diffedit bench shapes -e pixelman --kinds move --param energy_scale=0.5 --save $out-shapes-move-energy0.5"
    # The held-out tasks: the folder's settings (chosen on the tasks above), the papers' and the other
    # engines of the papers' order on scenes nothing was tuned on.
    "diffedit bench shapes -e direct --kinds $text_kinds --tasks $held_out --save $out-heldout-direct"
    "diffedit bench shapes -e direct --kinds $text_kinds --tasks $held_out -g 7.5 --param cross_replace=0.4 --param cross_replace_edited=0.4 --param self_replace=0.6 --save $out-heldout-direct-papers"
    "diffedit bench shapes -e ddim-p2p --kinds $text_kinds --tasks $held_out --save $out-heldout-ddim-p2p"
    "diffedit bench shapes -e ddim --kinds $text_kinds --tasks $held_out --save $out-heldout-ddim"
    "diffedit bench shapes -e ddim-p2p --kinds $text_kinds --tasks $held_out --param self_replace=1.0 --param cross_replace=0.8 --param cross_replace_edited=0.6 --save $out-heldout-ddim-p2p-direct-settings"
    "diffedit bench shapes -e infedit --kinds $text_kinds --tasks $held_out --save $out-heldout-infedit"
    # The papers' order task by task (each engine at its papers' defaults; paired 95 % intervals), from the runs above.
    "diffedit bench compare $out-shapes40-direct-papers $out-shapes40-ddim-p2p $out-shapes40-ddim --save $out-order"
    "diffedit bench compare $out-shapes40-ddim-p2p-g5 $out-shapes40-ddim-g5 --save $out-order-g5"
    "diffedit bench compare $out-heldout-direct-papers $out-heldout-ddim-p2p $out-heldout-ddim --save $out-heldout-order"
    # Direct Inversion at the folder's settings with an edit mask from the edited object's words, on both task files.
    "diffedit bench shapes -e direct --kinds $text_kinds --mask words --save $out-shapes40-direct-mask-words"
    "diffedit bench shapes -e direct --kinds $text_kinds --mask words --tasks $held_out --save $out-heldout-direct-mask-words"
    # ... grown by 2 px, the room a reshape's new outline needs (chosen on ShapesBench: 1-6 px in docs/benchmarks.md).
    "diffedit bench shapes -e direct --kinds $text_kinds --mask words --mask-dilate 2 --save $out-shapes40-direct-mask-words-dilate2"
    "diffedit bench shapes -e direct --kinds $text_kinds --mask words --mask-dilate 2 --tasks $held_out --save $out-heldout-direct-mask-words-dilate2"
    "diffedit bench shapes -e pixelman --kinds move --tasks $held_out --save $out-heldout-move"
    "diffedit bench shapes -e pixelman --kinds move --tasks $held_out --param energy_scale=0.5 --save $out-heldout-move-energy0.5"
    # Concept erasure: ShapesBench's erase tasks and the adapters' own measure.
    "diffedit bench shapes -e ddim --kinds erase --save $out-shapes-erase"
    "diffedit bench erase --save $out-erase"
    # Latent-consistency models against their teacher.
    "diffedit bench lcm --lcm-lora $lcm_lora --save $out-lcm"
    # Solvers' round trips (toy SD and the toy flow model).
    "diffedit bench solvers --save ${unversioned}solvers"
    # The toy flow model (which carries its own copy of this VAE): prompt following, every flow engine
    # on all 40 + 40 tasks and the reconstructions, and five tasks of each kind with and without masks.
    "json_to ${unversioned}flow-quality/results.json toy quality -m samples/toy-flow --n 200 --steps 28 -g 5"
    "diffedit bench shapes -m samples/toy-flow $flow_engines --kinds $text_kinds,reconstruct --save ${unversioned}shapes40-flow"
    "diffedit bench shapes -m samples/toy-flow $flow_engines --kinds $text_kinds --limit 5 --save ${unversioned}shapes-flow-mask-none"
    "diffedit bench shapes -m samples/toy-flow $flow_engines --kinds $text_kinds --limit 5 --mask object --save ${unversioned}shapes-flow-mask-object"
    "diffedit bench shapes -m samples/toy-flow $flow_engines --kinds $text_kinds --limit 5 --mask object --no-paste-back --save ${unversioned}shapes-flow-mask-object-nopaste"
    # The first 10 tasks of each kind at CFG 5 (docs/toy-world.md), RF-Inversion at three stops.
    "diffedit bench shapes -m samples/toy-flow -e ddim --kinds $text_kinds,reconstruct --limit 10 -g 5 --save ${unversioned}shapes-flow-ddim"
    "diffedit bench shapes -m samples/toy-flow -e ddpm-ef --kinds $text_kinds,reconstruct --limit 10 -g 5 --save ${unversioned}shapes-flow-ddpm-ef"
    "diffedit bench shapes -m samples/toy-flow -e bdia --kinds $text_kinds,reconstruct --limit 10 -g 5 --save ${unversioned}shapes-flow-bdia"
    "diffedit bench shapes -m samples/toy-flow -e flowedit --kinds $text_kinds,reconstruct --limit 10 -g 5 --save ${unversioned}shapes-flow-flowedit"
    "diffedit bench shapes -m samples/toy-flow -e rf-inversion --kinds $text_kinds,reconstruct --limit 10 -g 5 --param stop=0.25 --save ${unversioned}shapes-flow-rf-inversion"
    "diffedit bench shapes -m samples/toy-flow -e rf-inversion --kinds $text_kinds,reconstruct --limit 10 -g 5 --param stop=0.7 --save ${unversioned}shapes-flow-rf-inversion-stop0.7"
    "diffedit bench shapes -m samples/toy-flow -e rf-inversion --kinds $text_kinds,reconstruct --limit 10 -g 5 --param stop=0.8 --save ${unversioned}shapes-flow-rf-inversion-stop0.8"
    "diffedit bench shapes -m samples/toy-flow -e rf-inversion --kinds $text_kinds,reconstruct --param stop=0.8 --save ${unversioned}shapes40-flow-rf-inversion-stop0.8"
)

# `json_to FILE ARGS...`: diffedit ARGS --json into FILE, written only when the command succeeds.
json_to() {
    local file=$1
    shift
    mkdir -p "$(dirname "$file")"
    diffedit "$@" --json > "$file.tmp"
    mv "$file.tmp" "$file"
}

for command in "${commands[@]}"; do
    if [ -n "$skip" ] && [[ $command =~ $skip ]]; then
        continue
    fi
    if [ -n "$only" ] && ! [[ $command =~ $only ]]; then
        continue
    fi
    if [ "$list" = 1 ]; then
        echo "$command"
        continue
    fi
    echo "== $(date +%H:%M:%S) $command" >&2
    eval "$command"
done
