# /etc/profile.d/visionpipe.sh: Debian's /etc/profile resets PATH in login shells (ssh, Jupyter
# terminals); put the image's venv first again.
case ":$PATH:" in *:/opt/venv/bin:*) ;; *) export PATH="/opt/venv/bin:$PATH" ;; esac
