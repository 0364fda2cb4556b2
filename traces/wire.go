package traces

import (
	"fmt"
	"reflect"
	"sync"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// maxNesting bounds how deep messages may nest (AnyValue in KeyValueList
// in AnyValue...). protobuf-go allows 10000; an export needs a handful,
// and the walk below recurses.
const maxNesting = 256

var errNesting = fmt.Errorf("messages nested deeper than %d levels", maxNesting)

// wireCost walks b as an encoded message of type md without decoding it:
// it checks that b is well formed the way proto.Unmarshal checks it, and
// returns how many heap bytes decoding it would take, an estimate on the
// high side. Decoding multiplies memory: 4 MB of empty spans on the wire
// (2 bytes each) decode to 2 million 288-byte structs, 600 MB; 4 MB of a
// realistic export allocate 29 MB. So what a request costs is known, and paid to the in-flight budget,
// before a single struct is allocated.
func wireCost(b []byte, md protoreflect.MessageDescriptor) (int64, error) {
	return walk(b, shapeOf(md), 0)
}

func walk(b []byte, m *msgShape, depth int) (int64, error) {
	if depth > maxNesting {
		return 0, errNesting
	}
	cost := m.size
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, protowire.ParseError(n)
		}
		b = b[n:]
		f := m.field(num)
		if f == nil || !wireTypeFits(f.fd, typ) {
			// Unknown to this schema (or of another wire type, which
			// protobuf-go also keeps as unknown): its bytes are kept
			// in a slice that grows by appending.
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return 0, protowire.ParseError(m)
			}
			b = b[m:]
			cost += 2 * int64(n+m)
			continue
		}
		if typ != protowire.BytesType {
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return 0, protowire.ParseError(m)
			}
			b = b[m:]
			cost += f.slot
			continue
		}
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return 0, protowire.ParseError(m)
		}
		b = b[m:]
		switch f.fd.Kind() {
		case protoreflect.MessageKind:
			c, err := walk(v, f.message(), depth+1)
			if err != nil {
				return 0, err
			}
			cost += c + f.slot
		case protoreflect.StringKind:
			if !utf8.Valid(v) {
				return 0, fmt.Errorf("field %s: string is not valid UTF-8", f.fd.FullName())
			}
			cost += roundUp(len(v)) + f.slot
		case protoreflect.BytesKind:
			cost += roundUp(len(v)) + f.slot
		default:
			// Packed repeated scalars: at most one element per byte,
			// 8 bytes each, in a slice that doubles as it grows.
			cost += 16 * int64(len(v))
		}
	}
	return cost, nil
}

// msgShape is what walk needs of a message type, looked up once: going
// through protoreflect for every field made the walk a sixth of an
// export's cost.
type msgShape struct {
	size   int64         // the decoded struct's heap bytes
	fields []*fieldShape // by field number; nil where there is none
	md     protoreflect.MessageDescriptor
}

type fieldShape struct {
	fd   protoreflect.FieldDescriptor
	slot int64 // see slotBytes

	once  sync.Once
	child *msgShape
}

func (m *msgShape) field(num protowire.Number) *fieldShape {
	if num < 0 || int(num) >= len(m.fields) {
		return nil
	}
	return m.fields[num]
}

func (f *fieldShape) message() *msgShape {
	f.once.Do(func() { f.child = shapeOf(f.fd.Message()) })
	return f.child
}

var msgShapes sync.Map // protoreflect.FullName -> *msgShape

// shapeOf is md's shape, built on first use (children lazily: OTLP's
// AnyValue contains itself).
func shapeOf(md protoreflect.MessageDescriptor) *msgShape {
	if v, ok := msgShapes.Load(md.FullName()); ok {
		return v.(*msgShape)
	}
	m := &msgShape{size: messageBytes(md), md: md}
	fds := md.Fields()
	for i := range fds.Len() {
		fd := fds.Get(i)
		if fd.Number() > 1024 { // a sparse number: not in OTLP; walked as unknown
			continue
		}
		for int(fd.Number()) >= len(m.fields) {
			m.fields = append(m.fields, nil)
		}
		m.fields[fd.Number()] = &fieldShape{fd: fd, slot: slotBytes(fd)}
	}
	v, _ := msgShapes.LoadOrStore(md.FullName(), m)
	return v.(*msgShape)
}

// wireTypeFits reports whether typ is how fd may be encoded (packed or
// not, for repeated scalars).
func wireTypeFits(fd protoreflect.FieldDescriptor, typ protowire.Type) bool {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.StringKind, protoreflect.BytesKind:
		return typ == protowire.BytesType
	case protoreflect.GroupKind:
		return typ == protowire.StartGroupType
	case protoreflect.DoubleKind, protoreflect.Fixed64Kind, protoreflect.Sfixed64Kind:
		return typ == protowire.Fixed64Type || (fd.IsList() && typ == protowire.BytesType)
	case protoreflect.FloatKind, protoreflect.Fixed32Kind, protoreflect.Sfixed32Kind:
		return typ == protowire.Fixed32Type || (fd.IsList() && typ == protowire.BytesType)
	default: // varints: ints, bools, enums
		return typ == protowire.VarintType || (fd.IsList() && typ == protowire.BytesType)
	}
}

// slotBytes is what one more value of fd costs beyond its own bytes: a
// slot in a slice that doubles as it grows (twice the slot), or the
// wrapper struct a oneof member is allocated in.
func slotBytes(fd protoreflect.FieldDescriptor) int64 {
	switch {
	case fd.IsList() && fd.Kind() == protoreflect.StringKind, fd.IsList() && fd.Kind() == protoreflect.BytesKind:
		return 2 * 24
	case fd.IsList():
		return 2 * 8
	case fd.ContainingOneof() != nil:
		return 32
	}
	return 0
}

// roundUp is an allocation of n bytes with the allocator's rounding.
func roundUp(n int) int64 { return int64(n + n/8 + 16) }

// messageBytes is the heap one decoded message of md takes: its generated
// Go struct, rounded up as the allocator does.
func messageBytes(md protoreflect.MessageDescriptor) int64 {
	if mt, err := protoregistry.GlobalTypes.FindMessageByName(md.FullName()); err == nil {
		if t := reflect.TypeOf(mt.Zero().Interface()); t.Kind() == reflect.Pointer {
			return roundUp(int(t.Elem().Size()))
		}
	}
	return 256 // a type not linked in: a generous guess
}
