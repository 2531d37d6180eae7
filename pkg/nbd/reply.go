package nbd

func (c *serverConn) send(hdr []byte, data []byte) {
	c.writers.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr == nil {
		c.werr = c.fw.write(hdr, data)
	}
	if c.writers.Add(-1) == 0 && c.werr == nil {
		c.werr = c.fw.flush()
	}
	if c.werr != nil {
		// The client cannot be answered; end the connection so that it
		// sees the loss instead of waiting.
		c.raw.Close()
	}
}

func (c *serverConn) sendOK(q Request) {
	var b [simpleReplySize]byte
	c.send(AppendSimpleReply(b[:0], q.Cookie, 0), nil)
}

func (c *serverConn) sendData(q Request, data []byte) {
	if !c.structured {
		var b [simpleReplySize]byte
		c.send(AppendSimpleReply(b[:0], q.Cookie, 0), data)
		return
	}
	if len(data) == 0 {
		// A data chunk must carry a byte; a read must not get a simple
		// reply once structured replies are on.
		var b [structuredReplySize]byte
		c.send(AppendChunkHeader(b[:0], ReplyFlagDone, ChunkNone, q.Cookie, 0), nil)
		return
	}
	var b [structuredReplySize + 8]byte
	h := AppendChunkHeader(b[:0], ReplyFlagDone, ChunkOffsetData, q.Cookie, uint32(8+len(data)))
	c.send(be.AppendUint64(h, q.Offset), data)
}

func (c *serverConn) sendBlockStatus(q Request, ext []Extent) {
	p := AppendBlockStatus(nil, metaContextID, ext)
	h := AppendChunkHeader(nil, ReplyFlagDone, ChunkBlockStatus, q.Cookie, uint32(len(p)))
	c.send(h, p)
}

func (c *serverConn) sendError(q Request, errno Errno, msg string) {
	if !c.structured {
		var b [simpleReplySize]byte
		c.send(AppendSimpleReply(b[:0], q.Cookie, errno), nil)
		return
	}
	p := AppendErrorChunk(nil, ErrorChunk{Errno: errno, Message: msg})
	h := AppendChunkHeader(nil, ReplyFlagDone, ChunkError, q.Cookie, uint32(len(p)))
	c.send(h, p)
}
