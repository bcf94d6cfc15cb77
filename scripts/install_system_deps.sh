#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages segstream needs; skips what is already there.
#   runtime: python venv support (the wheels bring OpenCV/FFmpeg, TensorFlow, LiteRT), and
#            everything of `gst`: `make run` installs the low-delay reader.
#   gst:     the `gst` reader (low-delay RTSP): GStreamer with its RTSP, H.264 (libav) and
#            MJPEG plugins and their introspection data, and what `pip install '.[gst]'`
#            needs to build PyGObject and pycairo (there are no Linux wheels).
#   test:    the real peers the tests drive: gst-rtsp-server (via python3-gi), ffmpeg,
#            headless chromium and a prometheus server; iproute2 and util-linux (ip,
#            unshare) for the cluster test's network namespace; redis-server (the cluster
#            test's head-failure check keeps Ray's GCS state in a Redis it starts);
#            mosquitto and postgresql (the events tests start their own broker and
#            database server); nginx (the
#            documented TLS reverse proxy, deploy/nginx/, is run in front of a service; the
#            tests start their own, so a system nginx apt may start is not needed); and
#            everything of `gst`.
set -euo pipefail
want=()
gst=(gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-libav
     gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
     libgirepository1.0-dev libcairo2-dev pkg-config gcc python3-dev)
case "${1:-runtime}" in
  runtime) want=(python3-venv "${gst[@]}") ;;
  gst) want=("${gst[@]}") ;;
  test) want=(ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
              gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly chromium prometheus
              iproute2 util-linux redis-server mosquitto postgresql nginx "${gst[@]}") ;;
  *) echo "usage: $0 runtime|gst|test" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A pyenv/other interpreter with its own venv module does not need Debian's python3-venv.
if [[ " ${missing[*]} " == *" python3-venv "* ]] && python3 -c 'import ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
((${#missing[@]})) || exit 0
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
echo "installing system packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
