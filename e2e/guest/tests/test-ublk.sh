#!/bin/sh
FRONTEND=ublk exec /attach.sh
