module github.com/quorum-csi/quorum-csi

go 1.26
