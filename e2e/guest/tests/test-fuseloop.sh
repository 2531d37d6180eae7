#!/bin/sh
FRONTEND=fuse-loop exec /attach.sh
