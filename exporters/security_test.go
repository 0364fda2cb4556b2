package exporters

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// pki writes a CA, a server certificate for 127.0.0.1 and a client
// certificate, PEM, into dir.
func pki(t *testing.T, dir string) (ca, srvCert, srvKey, cliCert, cliKey string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	leaf := func(serial int64, usage x509.ExtKeyUsage, name string) (string, string) {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
			NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalECPrivateKey(k)
		return write(name+".crt", "CERTIFICATE", der), write(name+".key", "EC PRIVATE KEY", kder)
	}
	ca = write("ca.crt", "CERTIFICATE", caDER)
	srvCert, srvKey = leaf(2, x509.ExtKeyUsageServerAuth, "server")
	cliCert, cliKey = leaf(3, x509.ExtKeyUsageClientAuth, "client")
	return
}

func serveSecure(t *testing.T, sec ServerSecurity, st *signals.Store) string {
	t.Helper()
	opts, err := sec.ServerOptions()
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	svc := NewGRPC(GRPCOptions{Journal: rules.NewJournal(8), Store: st, Log: testLog(t)})
	svc.Register(srv)
	go srv.Serve(lis)
	t.Cleanup(func() { svc.Shutdown(); srv.Stop() })
	return lis.Addr().String()
}

func call(t *testing.T, addr string, c ClientSecurity) error {
	t.Helper()
	opts, err := c.DialOptions()
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = culpritv1.NewDiagnosticsClient(cc).GetSnapshot(ctx, &culpritv1.SnapshotRequest{})
	return err
}

func TestMutualTLSAndToken(t *testing.T) {
	dir := t.TempDir()
	ca, sc, sk, cc, ck := pki(t, dir)
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("0123456789abcdef-secret\n"), 0o600)
	addr := serveSecure(t, ServerSecurity{CertFile: sc, KeyFile: sk, ClientCAFile: ca, TokenFile: tokenFile}, signals.New(4, 16))

	good := ClientSecurity{CAFile: ca, CertFile: cc, KeyFile: ck, Token: "0123456789abcdef-secret"}
	if err := call(t, addr, good); err != nil {
		t.Fatalf("mTLS with the right token: %v", err)
	}
	noCert := good
	noCert.CertFile, noCert.KeyFile = "", ""
	if err := call(t, addr, noCert); status.Code(err) != codes.Unavailable {
		t.Errorf("TLS without a client certificate: %v, want the handshake refused", err)
	}
	wrong := good
	wrong.Token = "not-the-token-at-all"
	if err := call(t, addr, wrong); status.Code(err) != codes.Unauthenticated {
		t.Errorf("wrong token: %v", err)
	}
	if err := call(t, addr, ClientSecurity{Token: good.Token}); status.Code(err) != codes.Unavailable {
		t.Errorf("plaintext to a TLS server: %v", err)
	}
}

func TestTokenLeavesHealthOpen(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("0123456789abcdef"), 0o600)
	addr := serveSecure(t, ServerSecurity{TokenFile: tokenFile}, signals.New(4, 16))
	if err := call(t, addr, ClientSecurity{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("no token: %v", err)
	}
	if err := call(t, addr, ClientSecurity{Token: "0123456789abcdef"}); err != nil {
		t.Errorf("token over loopback: %v", err)
	}
	opts, _ := ClientSecurity{}.DialOptions()
	cc, _ := grpc.NewClient(addr, opts...)
	defer cc.Close()
	if _, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health without a token: %v", err)
	}
}

func TestBadSecurityFilesNameTheKey(t *testing.T) {
	for _, sec := range []ServerSecurity{
		{CertFile: "/nonexistent.crt", KeyFile: "/nonexistent.key"},
		{CertFile: "x.crt"},
		{ClientCAFile: "/ca.crt"},
		{TokenFile: "/nonexistent"},
	} {
		if _, err := sec.ServerOptions(); err == nil {
			t.Errorf("%+v: no error", sec)
		} else if !containsAny(err.Error(), "agent.tls_", "agent.token_file") {
			t.Errorf("%+v: error %q does not name the key", sec, err)
		}
	}
	short := filepath.Join(t.TempDir(), "t")
	os.WriteFile(short, []byte("short"), 0o600)
	if _, err := (ServerSecurity{TokenFile: short}).ServerOptions(); err == nil {
		t.Error("a 5-character token was accepted")
	}
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}

// A message over the limit is refused, not sent.
func TestMessageSizeLimit(t *testing.T) {
	st := signals.New(4, 4096)
	d := &signals.Desc{Name: "padding_with_a_long_name_to_grow_the_snapshot"}
	for i := range 3000 {
		st.Put(d, signals.L("i", string(rune('a'+i%26))+big.NewInt(int64(i)).String()), float64(i), time.Now())
	}
	addr := serveSecure(t, ServerSecurity{MaxMessageBytes: 64 << 10}, st)
	if err := call(t, addr, ClientSecurity{}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a snapshot over 64 KiB: %v", err)
	}
}
