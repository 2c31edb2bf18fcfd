#!/usr/bin/env bash
# Screenshots of TensorBoard as a reader sees it, for the README: a local `tensorboard --logdir`
# opened in headless Chromium (Debian: apt-get install chromium).
#   scripts/tensorboard_screenshots.sh LOGDIR [OUT_DIR]      # writes OUT_DIR/tensorboard_*.png
set -euo pipefail
logdir=$1; out=${2:-docs/images}; port=${PORT:-6123}
mkdir -p "$out"
tensorboard --logdir "$logdir" --port "$port" --host 127.0.0.1 >/dev/null 2>&1 &
tb=$!
trap 'kill $tb 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 1; done
shot() {  # shot NAME URL-FRAGMENT
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1000 \
    --virtual-time-budget=20000 --screenshot="$out/tensorboard_$1.png" "http://127.0.0.1:$port/$2" 2>/dev/null
}
shot custom_scalars "#custom_scalars"
shot images "#images"
shot hparams "#hparams"
echo "wrote $out/tensorboard_custom_scalars.png, $out/tensorboard_images.png, $out/tensorboard_hparams.png"
